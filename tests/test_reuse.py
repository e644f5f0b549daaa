"""Offline KV reuse on CPU (SmolLM2, fp32): store, relocate, splice, skip.

One engine with every head global (``reuse_llm`` in conftest), so RedKnot attention is
exactly dense and any difference comes from reuse itself; ``"reuse": "off"`` on the same
engine is the dense reference.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.conftest import COMMON, PREFACE, QUESTION, _doc, _engine, reuse_logprobs


def _run(llm: Any, prompt: list[int], reuse: str | None = None,
         salt: str | None = None, **params: Any) -> tuple[str, dict[str, Any]]:
    """Greedy text and RedKnot stats (``params``: more ``kv_transfer_params["redknot"]``
    options); ``salt`` keeps the prompt off earlier prefix-cache entries (a stored
    document's own blocks would otherwise be an exact hit)."""
    from vllm import SamplingParams

    from redknot_vllm import request_stats

    extra = {} if reuse is None else {"kv_transfer_params": {"redknot": {"reuse": reuse,
                                                                          **params}}}
    sp = SamplingParams(max_tokens=6, temperature=0.0, extra_args=extra)
    p: dict[str, Any] = {"prompt_token_ids": prompt}
    if salt is not None:
        p["cache_salt"] = salt
    out = llm.generate([p], sp, use_tqdm=False)[0]
    return out.outputs[0].text, request_stats(llm, [out.request_id])[out.request_id]


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_precompute_writes_verified_segments_with_deviation(reuse_llm, stored):
    from redknot_vllm.config import RedKnotConfig
    from redknot_vllm.kv_store import SegmentStore

    cfg = RedKnotConfig.from_additional_config(
        reuse_llm.llm_engine.vllm_config.additional_config)
    store = SegmentStore(host_bytes=0, disk_dir=cfg.reuse.store_dir)
    for name, digest in stored["digests"].items():
        seg = store.get(digest)
        assert seg is not None, name
        n = len(stored["ids"][name])
        assert seg.k.shape == (30, n, 3, 64) and seg.v.shape == seg.k.shape
        assert seg.deviation is not None and seg.deviation.shape == (n,)
        # a token's KV depends on context from layer 1 on: some deviation, never NaN
        assert torch.isfinite(seg.deviation).all() and float(seg.deviation.max()) > 0


def test_precompute_writes_each_segment_file_once(reuse_llm, stored):
    """One precompute of three new documents (one given twice): each segment file is written
    once (before: twice, the probe rewrote it with its deviation), the deviation once as a
    sidecar; a fresh reader gets it, and the recompute mask ranks chunks by it, also in the
    worker when the segments come from disk."""
    from vllm import SamplingParams

    from redknot_vllm import request_stats
    from redknot_vllm.config import RedKnotConfig
    from redknot_vllm.kv_store import SegmentStore, deviation_file, segment_file
    from redknot_vllm.reuse import precompute
    from redknot_vllm.reuse.policy import recompute_mask

    tok = stored["tok"]
    docs = [_ids(tok, _doc(name, code, 6)) for name, code in
            (("amber", "30517"), ("violet", "77164"), ("teal", "25880"))]

    def stats() -> dict[str, Any]:
        return reuse_llm.collective_rpc("redknot_reuse_stats")[0]

    before = stats()
    digests = precompute(reuse_llm, [*docs, docs[0]], progress=False)
    after = stats()
    assert digests[3] == digests[0] and len(set(digests)) == 3
    assert after["segment_writes"] - before["segment_writes"] == 3
    assert after["deviation_writes"] - before["deviation_writes"] == 3
    assert after["corrupt"] == before["corrupt"]
    # again: the segments are on disk, nothing is written; force stores them again
    assert precompute(reuse_llm, docs, progress=False) == digests[:3]
    again = stats()
    assert (again["segment_writes"], again["deviation_writes"]) == (
        after["segment_writes"], after["deviation_writes"])
    precompute(reuse_llm, docs[:1], progress=False, force=True)
    assert stats()["segment_writes"] == after["segment_writes"] + 1

    cfg = RedKnotConfig.from_additional_config(
        reuse_llm.llm_engine.vllm_config.additional_config).reuse
    store = SegmentStore(host_bytes=0, disk_dir=cfg.store_dir)
    for digest, ids in zip(digests, docs, strict=False):
        assert segment_file(cfg.store_dir, digest).is_file()
        assert deviation_file(cfg.store_dir, digest).is_file()
        seg = store.get(digest)
        assert seg is not None and seg.deviation is not None
        assert seg.meta["deviation"].startswith("probe offset ")
        assert torch.isfinite(seg.deviation).all() and float(seg.deviation.max()) > 0
        # beyond the first tokens, the chunks recomputed are the most deviating ones
        mask = recompute_mask(seg, cfg)
        n, c = len(ids), cfg.chunk
        score = torch.nn.functional.pad(seg.deviation, (0, (-n) % c)).view(-1, c).mean(1)
        first = -(-cfg.recompute_first // c)
        chosen = {i for i in range(first, score.numel()) if bool(mask[i * c])}
        assert chosen and chosen == set((score[first:].topk(len(chosen)).indices + first)
                                        .tolist())
        without = recompute_mask(dataclasses.replace(seg, deviation=None), cfg)
        assert int(without.sum()) == cfg.recompute_first < int(mask.sum())

    # the worker's store reopened without memory tiers: the segment and its sidecar come
    # from disk, and half of the document is recomputed by its deviation
    reuse_llm.collective_rpc("redknot_reuse_tiers", args=(0, 0))
    try:
        prompt = _ids(tok, PREFACE) + docs[1] + _ids(tok, QUESTION.format(name="violet"))
        sp = SamplingParams(max_tokens=6, temperature=0.0, extra_args={"kv_transfer_params": {
            "redknot": {"reuse": "auto", "recompute_fraction": 0.5}}})
        out = reuse_llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        reused = request_stats(reuse_llm, [out.request_id])[out.request_id]["reused_tokens"]
        assert "77164" in out.outputs[0].text
        # without deviation scores only the first 16 tokens would be recomputed
        assert 0.3 * len(docs[1]) < reused < 0.6 * len(docs[1])
        assert stats()["disk"]["hits"] >= 1 and stats()["corrupt"] == after["corrupt"]
    finally:
        reuse_llm.collective_rpc("redknot_reuse_tiers", args=(cfg.gpu_bytes, cfg.host_bytes))


def test_segment_reused_at_two_positions_answers_like_dense(reuse_llm, stored):
    tok, ids = stored["tok"], stored["ids"]
    # each document at two positions; SmolLM2 answers for the nearer document reliably
    q = {k: _ids(tok, QUESTION.format(name=k)) for k in ("blue", "red")}
    cases = [(_ids(tok, PREFACE) + ids["red"] + ids["blue"] + q["blue"], "48213"),
             (_ids(tok, PREFACE * 3) + ids["blue"] + ids["red"] + q["red"], "90357")]
    for prompt, code in cases:
        text, stats = _run(reuse_llm, prompt)
        dense, dstats = _run(reuse_llm, prompt, reuse="off")
        assert code in dense
        assert code in text, (text, dense)
        # the selective policy recomputes 16 first tokens + 15% of each segment, and skips
        # the rest: most of the two documents are spliced, and the FLOPs say so
        reused = stats["reused_tokens"]
        n_docs = len(ids["blue"]) + len(ids["red"])
        assert 0.6 * n_docs < reused < n_docs
        assert stats["prefill_tokens"] + reused == len(prompt)
        assert stats["flops_saved"] > 0.5
        assert dstats["reused_tokens"] == 0


def test_reuse_in_place_is_exact(reuse_llm, stored):
    """A document at position 0 with nothing before it: the stored KV *is* its in-context KV,
    so splicing it and computing only the question reproduces dense exactly (fp32)."""
    tok, ids = stored["tok"], stored["ids"]
    prompt = ids["red"] + _ids(tok, QUESTION.format(name="red"))

    (lp_reuse, toks_reuse, st), (lp_dense, toks_dense, _) = (
        reuse_logprobs(reuse_llm, prompt, "auto"), reuse_logprobs(reuse_llm, prompt, "off"))
    assert st["reused_tokens"] > len(ids["red"]) // 2 and st["cached_tokens"] == 0
    assert toks_reuse == toks_dense
    assert lp_reuse == pytest.approx(lp_dense, abs=1e-4)


def test_reuse_spans_chunked_prefill(reuse_llm, stored):
    """max_num_batched_tokens is 512: this prompt takes two steps, and the second document
    straddles the chunk boundary."""
    tok, ids = stored["tok"], stored["ids"]
    q = _ids(tok, QUESTION.format(name="blue"))
    prompt = _ids(tok, PREFACE * 2) + ids["red"] + ids["blue"] + q
    assert len(prompt) > COMMON["max_num_batched_tokens"]
    start_blue = len(prompt) - len(ids["blue"]) - len(q)
    assert start_blue < COMMON["max_num_batched_tokens"] < start_blue + len(ids["blue"])
    text, stats = _run(reuse_llm, prompt)
    assert "48213" in text
    assert stats["reused_tokens"] > 0.6 * (len(ids["red"]) + len(ids["blue"]))
    assert stats["prefill_tokens"] + stats["reused_tokens"] == len(prompt)


def test_prefix_cache_never_serves_reused_kv_to_exact_requests(reuse_llm, stored):
    tok, ids = stored["tok"], stored["ids"]
    head = _ids(tok, "A fresh preface that no earlier prompt used, long enough to fill blocks. "
                * 2)
    prompt = head + ids["blue"] + _ids(tok, QUESTION.format(name="blue"))
    _, first = _run(reuse_llm, prompt)  # approximate KV in its blocks
    assert first["reused_tokens"] > 0
    _, exact = _run(reuse_llm, prompt, reuse="off")
    # only the exact preface blocks may be shared; the document's blocks were salted
    assert exact["cached_tokens"] <= len(head)
    assert exact["reused_tokens"] == 0


def test_bad_request_params_are_logged_and_computed(reuse_llm, stored):
    from vllm import SamplingParams

    tok, ids = stored["tok"], stored["ids"]
    prompt = ids["blue"] + _ids(tok, QUESTION.format(name="blue"))
    sp = SamplingParams(max_tokens=6, temperature=0.0,
                        extra_args={"kv_transfer_params": {"redknot": {"reuse": 5}}})
    out = reuse_llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
    assert "48213" in out.outputs[0].text


def test_marked_ranges_reuse_only_what_is_marked(reuse_llm, stored):
    tok, ids = stored["tok"], stored["ids"]
    pre = _ids(tok, PREFACE)
    prompt = pre + ids["blue"] + ids["red"] + _ids(tok, QUESTION.format(name="red"))
    a = len(pre) + len(ids["blue"])
    text, stats = _run(reuse_llm, prompt, reuse=[[a, a + len(ids["red"])]])  # type: ignore[arg-type]
    assert "90357" in text
    assert 0 < stats["reused_tokens"] < len(ids["red"])


def test_request_params_validation():
    from redknot_vllm.config import RedKnotConfigError
    from redknot_vllm.reuse.params import parse_params

    assert parse_params(None).reuse == "auto"
    assert parse_params({"redknot": {"reuse": [[3, 90]]}}).reuse == [(3, 90)]
    for bad, field in (({"reuse": 5}, '"reuse"'), ({"reuse": [[5, 2]]}, '"reuse"'),
                       ({"store": "yes"}, '"store"'), ({"probe": {"digest": 1}}, '"probe"'),
                       ({"nope": 1}, "unknown"), ({"recompute_fraction": 1.5},
                                                  '"recompute_fraction"'),
                       ({"recompute_fraction": True}, '"recompute_fraction"')):
        with pytest.raises(RedKnotConfigError, match=re.escape(field)):
            parse_params({"redknot": bad})
    assert parse_params({"redknot": {"recompute_fraction": 0}}).recompute_fraction == 0.0


def test_request_recompute_fraction_overrides_the_engine_share(reuse_llm, stored):
    from vllm import SamplingParams

    from redknot_vllm import request_stats

    tok, ids = stored["tok"], stored["ids"]
    prompt = _ids(tok, PREFACE * 2) + ids["red"] + ids["blue"] + _ids(
        tok, QUESTION.format(name="blue"))
    reused = {}
    for frac in (0.0, 0.5):
        sp = SamplingParams(max_tokens=6, temperature=0.0, extra_args={"kv_transfer_params": {
            "redknot": {"reuse": "auto", "recompute_fraction": frac}}})
        out = reuse_llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        st = request_stats(reuse_llm, [out.request_id])[out.request_id]
        reused[frac] = st["reused_tokens"]
        assert "48213" in out.outputs[0].text
        assert st["cached_tokens"] <= len(_ids(tok, PREFACE * 2))  # salted per fraction
    n_docs = len(ids["blue"]) + len(ids["red"])
    # 0.0: only each segment's first 16 tokens (and the sampled last one) are computed
    assert reused[0.0] >= n_docs - 2 * 16 - 1
    assert reused[0.5] < reused[0.0] - 0.4 * n_docs


def test_reuse_config_validation():
    from redknot_vllm.config import RedKnotConfigError, ReuseConfig

    with pytest.raises(RedKnotConfigError, match=r"reuse\.policy"):
        ReuseConfig(policy="cacheblend")
    with pytest.raises(RedKnotConfigError, match=r"reuse\.recompute_fraction"):
        ReuseConfig(recompute_fraction=1.5)
    for bad in (1, 0, 2.5, True):  # layer 0's KV never deviates: at least 2
        with pytest.raises(RedKnotConfigError, match=r"reuse\.blend_layers"):
            ReuseConfig(blend_layers=bad)
    with pytest.raises(RedKnotConfigError, match="unknown option"):
        ReuseConfig.from_dict({"store": "/x"})


def test_catalog_finds_leftmost_longest_segments():
    from redknot_vllm.kv_store import SegmentKey
    from redknot_vllm.reuse.catalog import Catalog

    def key(ids: list[int]) -> SegmentKey:
        return SegmentKey("f", "h", "t", False, tuple(ids), "l")

    a, b = list(range(100, 180)), list(range(100, 140))  # b is a prefix of a
    c = list(range(500, 570))
    cat = Catalog()
    for ids in (a, b, c):
        cat.add(key(ids), key(ids).digest())
    prompt = [1, 2, 3] + a + [7] + c + b[:30] + [9]
    uses = cat.find(prompt, 0)
    assert [(u.start, u.length) for u in uses] == [(3, 80), (84, 70)]
    assert cat.find(prompt, 4) == [uses[1]]  # a prefix hit past a segment's start
    assert cat.exact(c) == key(c).digest()


def test_restrict_tokens_runs_attend_like_the_full_step():
    """Attention of kept tokens over a cache holding every token's KV is the same whether the
    step computes all tokens or only the kept runs."""
    from redknot_vllm.attention.metadata import build_metadata, restrict_tokens
    from redknot_vllm.kernels.headclass_attention import (
        FULL,
        HeadGroup,
        paged_headclass_attention,
    )

    torch.manual_seed(0)
    bs, h, d, n_blocks = 16, 2, 8, 16
    lens, ctx = [40, 1], [0, 30]  # a 40-token prefill row and a decode row
    seq = [c + q for c, q in zip(ctx, lens, strict=True)]
    qsl = [0, 40, 41]
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
    slots = torch.cat([torch.arange(c, s) + 0 for c, s in zip(ctx, seq, strict=True)])
    slots[40:] += 4 * bs
    cache = torch.randn(n_blocks, h, bs, 2 * d)
    md = build_metadata(query_start_loc_cpu=qsl, seq_lens_cpu=seq, is_prefill_cpu=[True, False],
                        block_table=table, slot_mapping=slots, device=torch.device("cpu"))
    assert md.max_query_len == 40 and md.max_seq_len == 40
    groups = (HeadGroup((0,), FULL, 0), HeadGroup((1,), 8, 2))
    q = torch.randn(41, h, d)
    full = torch.empty_like(q)
    paged_headclass_attention(q, cache, table, qsl, seq, md.is_prefill_cpu, groups, 0.3, full)
    keep = torch.ones(41, dtype=torch.bool)
    keep[5:17] = False
    keep[20:33] = False
    small, kept, firsts = restrict_tokens(md, keep)
    assert small.num_reqs == 4 and small.query_start_loc_cpu == [0, 5, 8, 15, 16]
    assert small.seq_lens_cpu == [5, 20, 40, 31]
    assert firsts == [0, 0, 0, 30 + 4 * bs]  # each run keeps its request's first slot
    out = torch.empty(int(keep.sum()), h, d)
    paged_headclass_attention(q[kept], cache, small.block_table, small.query_start_loc_cpu,
                              small.seq_lens_cpu, small.is_prefill_cpu, groups, 0.3, out)
    torch.testing.assert_close(out, full[kept])


@pytest.fixture(scope="session")
def seed_policy_llm(smollm2: str, local_head_config: Any,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from redknot_vllm import engine_args

    store = tmp_path_factory.mktemp("segments-seed")
    yield from _engine(**engine_args(smollm2, head_config=local_head_config,
                                     reuse={"store_dir": str(store), "policy": "seed",
                                            "client_store": True},
                                     **COMMON))


def test_seed_policy_computes_every_token_and_reads_stored_kv_in_local_heads(seed_policy_llm):
    from redknot_vllm.reuse import precompute

    tok = seed_policy_llm.get_tokenizer()
    doc = _ids(tok, _doc("blue", "48213", 14))
    precompute(seed_policy_llm, [doc], probe=None, progress=False)
    q = _ids(tok, QUESTION.format(name="blue"))
    # in place the stored KV is the in-context KV: overwriting local heads changes nothing
    in_place, st = _run(seed_policy_llm, doc + q, salt="a")
    assert st["cached_tokens"] == 0
    assert in_place == _run(seed_policy_llm, doc + q, reuse="off", salt="b")[0]
    prompt = _ids(tok, PREFACE) + doc + q
    _, stats = _run(seed_policy_llm, prompt)
    _, exact = _run(seed_policy_llm, prompt, reuse="off")
    # nothing is skipped: the seed policy only swaps local heads' KV of reused tokens
    assert stats["reused_tokens"] == 0 and stats["prefill_tokens"] == len(prompt)
    assert stats["flops_saved"] == pytest.approx(exact["flops_saved"])


def test_marked_range_is_stored_the_first_time_it_is_seen(reuse_llm, stored):
    tok = stored["tok"]
    doc = _ids(tok, _doc("green", "61724", 10))
    q = _ids(tok, QUESTION.format(name="green"))
    pre = _ids(tok, PREFACE)
    first = pre + doc + q
    text, stats = _run(reuse_llm, first, reuse=[[len(pre), len(pre) + len(doc)]])  # type: ignore[arg-type]
    assert stats["reused_tokens"] == 0 and "61724" in text  # computed, then stored
    later = _ids(tok, PREFACE * 2) + doc + q  # elsewhere, found by content
    text, stats = _run(reuse_llm, later)
    assert stats["reused_tokens"] > len(doc) // 2
    assert "61724" in text


def test_prompt_logprobs_turn_reuse_off(reuse_llm, stored):
    from vllm import SamplingParams

    from redknot_vllm import request_stats

    tok, ids = stored["tok"], stored["ids"]
    prompt = _ids(tok, PREFACE) + ids["blue"] + _ids(tok, QUESTION.format(name="blue"))
    sp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    out = reuse_llm.generate([{"prompt_token_ids": prompt, "cache_salt": "plp"}], sp,
                             use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == len(prompt)
    assert request_stats(reuse_llm, [out.request_id])[out.request_id]["reused_tokens"] == 0


def test_recompute_fraction_is_the_share_of_the_whole_segment():
    from redknot_vllm.config import ReuseConfig
    from redknot_vllm.kv_store import Segment, SegmentKey
    from redknot_vllm.reuse.policy import recompute_mask

    cfg = ReuseConfig()  # first 16, chunk 16, fraction 0.15
    for n in (1024, 8192):
        key = SegmentKey(model_fingerprint="m", head_config_hash="h", tokenizer="t",
                         layout="l", bos=False, token_ids=tuple(range(n)))
        dev = torch.arange(n, dtype=torch.float32).flip(0)  # earliest chunks deviate most
        seg = Segment(key, torch.zeros(1, n, 1, 2), torch.zeros(1, n, 1, 2), dev)
        for frac in (0.0, 0.1, 0.15):
            mask = recompute_mask(seg, cfg, frac)
            assert mask[:16].all()
            # within one chunk of the requested share, first tokens included
            assert abs(int(mask.sum()) - max(16, frac * n)) <= cfg.chunk / 2 + 1, (n, frac)
        # the most deviating chunks are the ones chosen
        assert recompute_mask(seg, cfg, 0.1)[:int(0.1 * n) - 8].all()


def test_catalog_find_equals_the_position_by_position_scan():
    """The vectorised match finds exactly what a scan of every position finds."""
    import random

    from redknot_vllm.kv_store import SegmentKey
    from redknot_vllm.reuse.catalog import ANCHOR, Catalog
    from redknot_vllm.reuse.params import Use

    def scan(cat: Catalog, tokens: list[int], start: int) -> list[Use]:
        uses, i, n = [], start, len(tokens)
        while i + ANCHOR <= n:
            best = None
            for digest, ids in cat._by_anchor.get(tuple(tokens[i:i + ANCHOR]), {}).items():
                if (len(ids) <= n - i and (best is None or len(ids) > best.length)
                        and tuple(tokens[i:i + len(ids)]) == ids):
                    best = Use(digest, i, len(ids))
            i = i + 1 if best is None else i + best.length
            if best is not None:
                uses.append(best)
        return uses

    rng = random.Random(0)
    docs = [[rng.randrange(5, 60) for _ in range(rng.randrange(16, 90))] for _ in range(12)]
    docs += [docs[0][:40], docs[3] + docs[4]]  # a prefix of another, a concatenation
    cat = Catalog()
    for d in docs:
        key = SegmentKey("f", "h", "t", False, tuple(d), "l")
        cat.add(key, key.digest())
    for trial in range(200):
        parts = [rng.choice(docs) if rng.random() < 0.5 else
                 [rng.randrange(5, 60) for _ in range(rng.randrange(0, 30))]
                 for _ in range(rng.randrange(1, 8))]
        prompt = [t for p in parts for t in p]
        start = rng.randrange(0, max(1, len(prompt)))
        assert cat.find(prompt, start) == scan(cat, prompt, start), trial
    cat.discard(cat.exact(docs[0]))
    prompt = docs[0] + docs[1]
    assert cat.find(prompt, 0) == scan(cat, prompt, 0)


def _three_segments() -> tuple[list[int], int, list[tuple[int, int]]]:
    """Twenty filler tokens, then three 64-token segments of four 16-token records
    ("<name> <name+1> was born in <city>."): (those tokens, the name the tests ask about:
    segment 1's record 2, the segments' (start, length))."""
    def record(name: int, city: int) -> list[int]:
        return [name, name + 1, 900, 901, 902, city, 903] + [5] * 9

    segs = [t for s in range(3) for i in range(4)
            for t in record(100 + 40 * s + 10 * i, 500 + 4 * s + i)]
    return [7] * 20 + segs, 100 + 40 * 1 + 10 * 2, [(20 + 64 * s, 64) for s in range(3)]


def test_question_focus_ranks_the_chunks_the_question_names():
    """Three record segments; the question names the person of the second one's third
    record: that chunk (and the one after it) rank first, a pair every record has counts
    little, and a segment sharing nothing rare with the question has no focus."""
    from redknot_vllm.reuse.policy import question_focus

    context, asked, uses = _three_segments()
    prompt = context + [800, 801, asked, asked + 1, 900, 901, 902]
    focus = question_focus(prompt, uses, chunk=16)
    assert focus[1][:2] == (2, 3)  # the named record's chunk, then the one after it
    assert all(2 not in f[:1] for i, f in enumerate(focus) if i != 1)
    # "was born in" is in every record: weight 1/12 per pair, under the name's 1/1
    assert len(focus[0]) == 4 and focus[1][0] == 2
    assert question_focus(prompt[:-7] + [1, 2, 3], uses, 16) == [(), (), ()]


def test_pooled_plan_recomputes_the_asked_segment_whole_within_the_request_budget():
    """``pooled``: the request's share of all its reused tokens goes first to the segment
    the question names (whole, while the budget holds it), the rest by deviation in
    proportion to length; the masks the worker makes from the plan spend exactly it."""
    from redknot_vllm.config import ReuseConfig
    from redknot_vllm.kv_store import Segment, SegmentKey
    from redknot_vllm.reuse.policy import pooled_plan, recompute_mask

    context, asked, uses = _three_segments()
    prompt = context + [800, 801, asked, asked + 1]
    cfg = ReuseConfig(recompute_first=16, chunk=16)

    def masks(plan):
        out = []
        for (a, n), (f, focus) in zip(uses, plan, strict=True):
            key = SegmentKey(model_fingerprint="m", head_config_hash="h", tokenizer="t",
                             layout="l", bos=False, token_ids=tuple(prompt[a:a + n]))
            dev = torch.arange(n, dtype=torch.float32)
            seg = Segment(key, torch.zeros(1, n, 1, 2), torch.zeros(1, n, 1, 2), dev)
            out.append(recompute_mask(seg, cfg, f, focus))
        return out

    # half of 192 tokens: every first chunk (3) + 3 chunks, all in the asked segment
    plan = pooled_plan(prompt, uses, cfg, 0.5)
    assert plan[1][1][:2] == (2, 3) and sorted(plan[1][1]) == [1, 2, 3]
    m = masks(plan)
    assert m[1].all() and int(m[0].sum()) == 16 and int(m[2].sum()) == 16
    # three quarters: the asked segment whole, the other 3 chunks by deviation, 2 + 1
    plan = pooled_plan(prompt, uses, cfg, 0.75)
    m = masks(plan)
    assert m[1].all() and sum(int(x.sum()) for x in m) == 144
    assert sorted(int(x.sum()) for x in (m[0], m[2])) == [32, 48]
    assert all(x[-16:].all() for x in (m[0], m[2]) if int(x.sum()) == 48)  # most deviating
    # no question match: the per-segment rule's shares
    plan = pooled_plan(prompt[:-4] + [1, 2, 3, 4], uses, cfg, 0.5)
    assert [f for f, _ in plan] == [0.5, 0.5, 0.5] and all(not c for _, c in plan)
    assert pooled_plan(prompt, [], cfg, 0.5) == []


def test_recompute_mask_takes_the_focus_first_then_the_deviation():
    from redknot_vllm.config import ReuseConfig
    from redknot_vllm.kv_store import Segment, SegmentKey
    from redknot_vllm.reuse.policy import recompute_mask

    cfg = ReuseConfig(recompute_first=16, chunk=16, recompute_fraction=0.25)
    n = 256  # 16 chunks; the share is 4 of them, the first tokens' chunk included
    key = SegmentKey(model_fingerprint="m", head_config_hash="h", tokenizer="t", layout="l",
                     bos=False, token_ids=tuple(range(n)))
    dev = torch.arange(n, dtype=torch.float32)  # the last chunks deviate most
    seg = Segment(key, torch.zeros(1, n, 1, 2), torch.zeros(1, n, 1, 2), dev)
    chunks = lambda m: [c for c in range(16) if bool(m[c * 16])]  # noqa: E731
    assert chunks(recompute_mask(seg, cfg)) == [0, 13, 14, 15]
    # focus chunk 0 is the first tokens' already; 5 and 7 come next, then the deviation
    assert chunks(recompute_mask(seg, cfg, focus=(0, 5, 7))) == [0, 5, 7, 15]
    assert chunks(recompute_mask(seg, cfg, focus=(3, 4, 5, 6, 7))) == [0, 3, 4, 5]
    assert chunks(recompute_mask(seg, cfg, focus=(99,))) == [0, 13, 14, 15]  # out of range


def test_anchored_plan_points_at_the_segment_the_question_names():
    """``anchored``: the use sharing most with the question is the anchor (ties: the
    earlier), found by position when marked ranges come out of order; no match, none."""
    from redknot_vllm.reuse.policy import anchored_plan

    context, asked, uses = _three_segments()
    prompt = context + [800, 801, asked, asked + 1]
    anchor, focus = anchored_plan(prompt, uses, 16)
    assert anchor == 1 and focus[1][:1] == (2,)
    anchor, _ = anchored_plan(prompt, uses[::-1], 16)
    assert anchor == 1  # the same segment, listed second of three
    assert anchored_plan(prompt[:-4] + [1, 2, 3, 4], uses, 16)[0] is None
    # two segments asked equally: the earlier one, so more is computed, not less
    tie = context[:84] + context[20:84] + [800, 801, 100, 101]  # segment 0 twice
    assert anchored_plan(tie, [(84, 64), (20, 64)], 16)[0] == 1
    assert anchored_plan(prompt, [], 16) == (None, [])


def test_request_recompute_select_is_validated_and_changes_the_salt(reuse_llm, stored):
    from vllm import SamplingParams

    from redknot_vllm import request_stats
    from redknot_vllm.config import RedKnotConfigError, ReuseConfig
    from redknot_vllm.reuse.params import parse_params

    assert parse_params({"redknot": {"recompute_select": "question"}}).recompute_select \
        == "question"
    with pytest.raises(RedKnotConfigError, match='"recompute_select"'):
        parse_params({"redknot": {"recompute_select": "attention"}})
    with pytest.raises(RedKnotConfigError, match=r"reuse\.recompute_select"):
        ReuseConfig(recompute_select="attention")
    tok, ids = stored["tok"], stored["ids"]
    prompt = _ids(tok, PREFACE * 2) + ids["red"] + ids["blue"] + _ids(
        tok, QUESTION.format(name="blue"))
    for select in ("deviation", "question", "pooled", "blend"):
        sp = SamplingParams(max_tokens=6, temperature=0.0, extra_args={"kv_transfer_params": {
            "redknot": {"reuse": "auto", "recompute_select": select}}})
        out = reuse_llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        st = request_stats(reuse_llm, [out.request_id])[out.request_id]
        assert "48213" in out.outputs[0].text
        assert st["reused_tokens"] > 0.6 * (len(ids["blue"]) + len(ids["red"]))
        # the question-chosen set is salted apart from the deviation's
        assert st["cached_tokens"] <= len(_ids(tok, PREFACE * 2))


def test_anchored_computes_the_asked_document_and_those_after_it(reuse_llm, stored):
    """``recompute_select="anchored"`` through the engine: asked about the second
    document, the first is reused under the question rule and the second computed; asked
    about the first, both are computed (nothing reused, the prompt's dense answer)."""
    tok, ids = stored["tok"], stored["ids"]
    head = _ids(tok, PREFACE * 4)
    docs = ids["red"] + ids["blue"]
    text, st = _run(reuse_llm, head + docs + _ids(tok, QUESTION.format(name="blue")),
                    "auto", salt="anchored-blue", recompute_select="anchored")
    assert "48213" in text
    assert 0.6 * len(ids["red"]) < st["reused_tokens"] < len(ids["red"])
    prompt = head + docs + _ids(tok, QUESTION.format(name="red"))
    text, st = _run(reuse_llm, prompt, "auto", salt="anchored-red",
                    recompute_select="anchored")
    dense, _ = _run(reuse_llm, prompt, "off", salt="anchored-red-dense")
    assert st["reused_tokens"] == 0 and st["prefill_tokens"] == len(prompt)
    assert text == dense


def test_blend_chunks_picks_each_segments_most_deviating_chunks():
    from redknot_vllm.reuse.blend import BlendGroup, blend_chunks, kv_deviation

    # two segments' candidates: chunks of 2 tokens; the second segment's chunk 5 is
    # partial (one token), ties go to the earlier chunk
    dev = torch.tensor([0.1, 0.1, 0.9, 0.7, 0.2, 0.2,   # segment A: chunks 1, 2, 3
                        0.5, 0.5, 0.3, 0.3, 0.5, 0.8])  # segment B: chunks 2, 3, 4, 5
    groups = [BlendGroup(0, torch.tensor([1, 1, 2, 2, 3, 3]), 1),
              BlendGroup(6, torch.tensor([2, 2, 3, 3, 4, 5]), 2)]
    picked = blend_chunks(dev, groups)
    assert picked.tolist() == [False, False, True, True, False, False,
                               True, True, False, False, False, True]
    none = blend_chunks(dev, [BlendGroup(0, groups[0].chunk_ids, 0)])
    assert not none.any()
    # relative distance of K and V, averaged over both and the heads
    k = torch.ones(3, 2, 4)
    v = torch.ones(3, 2, 4)
    fresh_k = k.clone()
    fresh_k[1] *= 2  # token 1's K moved by 100% on both heads
    assert kv_deviation(fresh_k, v, k, v).tolist() == pytest.approx([0.0, 0.5, 0.0])


def test_blend_runs_first_layers_on_every_token_and_is_exact_at_full_share(reuse_llm,
                                                                            stored):
    """``recompute_select="blend"`` over a prompt of two steps (the second document
    straddles the chunk boundary): at share 1 every chunk is picked after the first two
    layers, so the result is dense's; at the default share most of the documents are
    spliced from layer 2 on and the answer holds; the FLOPs count the two layers that ran
    on every token."""
    tok, ids = stored["tok"], stored["ids"]
    prompt = _ids(tok, PREFACE * 2) + ids["red"] + ids["blue"] + _ids(
        tok, QUESTION.format(name="blue"))
    n_docs = len(ids["blue"]) + len(ids["red"])
    lp_d, toks_d, st_d = reuse_logprobs(reuse_llm, prompt, "off", salt="blend-dense")
    lp_f, toks_f, st_f = reuse_logprobs(reuse_llm, prompt, "auto", salt="blend-1",
                                        recompute_select="blend", recompute_fraction=1.0)
    assert st_f["reused_tokens"] == 0 and st_f["prefill_tokens"] == len(prompt)
    assert toks_f == toks_d
    assert lp_f == pytest.approx(lp_d, abs=1e-4)
    text, st = _run(reuse_llm, prompt, "auto", salt="blend-default",
                    recompute_select="blend")
    assert "48213" in text
    assert 0.6 * n_docs < st["reused_tokens"] < n_docs
    assert st["prefill_tokens"] + st["reused_tokens"] == len(prompt)
    # the reused tokens ran 2 of the 30 layers: saved is below what skipping them saves
    _, st_q = _run(reuse_llm, prompt, salt="blend-question")
    per_token = st["flops_saved"] / st["reused_tokens"]
    assert per_token < 0.97 * st_q["flops_saved"] / st_q["reused_tokens"]
    assert st_d["reused_tokens"] == 0



@pytest.fixture(scope="module")
def context_llm(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An engine whose documents are stored behind ``reuse.store_context``."""
    from redknot_vllm import HeadConfig, engine_args

    hc = HeadConfig.shape(30, 3, 1.0, window=64)
    yield from _engine(**engine_args(
        smollm2, head_config=hc, **COMMON,
        reuse={"store_dir": str(tmp_path_factory.mktemp("ctx-segments")), "chunk": 16,
               "client_store": True, "store_context": PREFACE * 3}))


def test_store_context_stores_the_documents_kv_behind_it(context_llm, stored):
    """precompute computes each document behind the engine's store_context and stores it
    without it, keyed by it: placed back behind the same context the spliced KV is that
    prompt's own (dense's logprobs); segments stored alone are not this engine's; a plain
    ``store`` request is refused here (logged, nothing stored)."""
    from redknot_vllm.kv_store import SegmentStore
    from redknot_vllm.reuse import precompute
    from redknot_vllm.reuse.keys import reuse_setup

    tok, ids = stored["tok"], stored["ids"]
    setup = reuse_setup(context_llm.llm_engine.vllm_config)
    digests = precompute(context_llm, [ids["red"], ids["blue"]], progress=False)
    assert set(digests).isdisjoint(stored["digests"].values())
    seg = SegmentStore(disk_dir=setup.store_dir).get(digests[0])
    assert seg is not None and seg.key.context == setup.cfg.context_hash() != ""
    assert seg.meta["source"] == "computed behind reuse.store_context"
    assert seg.deviation is not None and seg.k.shape[1] == len(ids["red"])
    prompt = _ids(tok, PREFACE * 3) + ids["red"] + _ids(tok, QUESTION.format(name="red"))
    (lp_r, toks_r, st), (lp_d, toks_d, _) = (
        reuse_logprobs(context_llm, prompt, "auto", salt="ctx-reuse"),
        reuse_logprobs(context_llm, prompt, "off", salt="ctx-dense"))
    assert st["reused_tokens"] > len(ids["red"]) // 2
    assert toks_r == toks_d
    assert lp_r == pytest.approx(lp_d, abs=1e-4)
    from redknot_vllm.config import RedKnotConfigError

    with pytest.raises(RedKnotConfigError, match="is precompute's probe text"):
        precompute(context_llm, [ids["red"]], probe=PREFACE * 3, progress=False)
    with pytest.raises(RedKnotConfigError, match=r"documents \[0\] do not fit behind"):
        precompute(context_llm, [[13] * (COMMON["max_model_len"] - 8)], progress=False)
    # the documents stored alone (by reuse_llm, in another store) are unknown here, and a
    # request storing a prompt alone is refused on this engine
    n_files = len(list(setup.store_dir.rglob("*.safetensors")))
    _run(context_llm, ids["blue"] + [13], "auto", salt="ctx-plain-store", store=True)
    assert len(list(setup.store_dir.rglob("*.safetensors"))) == n_files
