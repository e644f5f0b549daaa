"""SegPaged in a CPU engine: two KV-cache groups, local heads that keep and read only their
sink and window pages, in prefill and in decode (``docs/segpaged-design.md`` step 3)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import COMMON, _engine, long_prompt

W, S = 64, 4
KV_BYTES = 384 << 20
"""Smaller than the session engines' cache: these engines start while those still live."""


def _config() -> Any:
    """Head 0 of every layer global, heads 1 and 2 local (W=64, sink 4): one split."""
    from redknot_vllm import HeadConfig

    return HeadConfig.from_dict({
        "num_layers": 30, "num_kv_heads": 3,
        "kv_head_classification": [["global", "local", "local"]] * 30,
        "kv_head_max_distance": [[-1, W, W]] * 30, "kv_head_sink_size": [[0, S, S]] * 30,
    }, source="<segpaged test>")


@pytest.fixture(scope="module")
def seg_llm(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """In process, so the test reads the scheduler's KV-cache manager; with offline reuse
    (its own store: nothing is stored before the reuse tests at the end of the module)."""
    from redknot_vllm import engine_args

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        store = tmp_path_factory.mktemp("segpaged-segments")
        gen = _engine(**engine_args(smollm2, head_config=_config(), segpaged=True,
                                    reuse={"store_dir": str(store), "chunk": 16,
                                           "client_store": True},
                                    **{**COMMON, "kv_cache_memory_bytes": KV_BYTES}))
        llm = next(gen)
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
    yield llm
    next(gen, None)


def _scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def _greedy(llm: Any, prompts: list[Any], n: int = 12) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_two_groups_and_more_sessions_than_dense(seg_llm):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from redknot_vllm.segpaged.spec import SinkSlidingWindowSpec

    kvc = _scheduler(seg_llm).kv_cache_config
    specs = [g.kv_cache_spec for g in kvc.kv_cache_groups]
    assert [type(s) for s in specs] == [FullAttentionSpec, SinkSlidingWindowSpec]
    assert [len(g.layer_names) for g in kvc.kv_cache_groups] == [30, 30]
    assert all(n.endswith("self_attn.attn_local") for n in kvc.kv_cache_groups[1].layer_names)
    g, loc = specs
    assert (g.num_kv_heads, loc.num_kv_heads) == (1, 2)
    assert (loc.sliding_window, loc.num_sink_tokens) == (W, S)
    # vLLM's own capacity figure, against the same bytes holding every head of every token
    per_token = 30 * 3 * 2 * g.head_size * g.dtype.itemsize
    # the groups' tensors alias one allocation (a block belongs to one group at a time)
    budget = max(t.size for t in kvc.kv_cache_tensors)
    dense = budget / (per_token * COMMON["max_model_len"])
    got = seg_llm.llm_engine.vllm_config.cache_config.kv_cache_max_concurrency
    # a local head holds its sink block, the window and one chunk in flight (512 tokens),
    # in whole blocks, of 8192 positions; the global head's pages dominate: on CPU's
    # 128-token blocks 3 * 8192 / (8192 + 2 * 7 * 128) = 2.5x
    assert 2.2 * dense < got < 3.0 * dense


def test_local_decode_matches_hf_reference_with_masks_in_decode(smollm2, seg_llm):
    """Chunked prompt, then 12 decode steps whose local heads see sinks + window only."""
    from transformers import AutoTokenizer

    from tests.hf_reference import greedy_reference

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(long_prompt(24))["input_ids"]
    assert len(ids) > 2 * COMMON["max_num_batched_tokens"]  # chunked, and far beyond S + W
    got = _greedy(seg_llm, [{"prompt_token_ids": ids}])[0]
    assert got == greedy_reference(smollm2, _config(), ids, 12, classed_decode=True)


def test_requests_hold_only_sink_and_window_pages(seg_llm):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, sched = seg_llm.llm_engine, _scheduler(seg_llm)
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    ids = list(range(1000, 2300))  # 1,300 tokens: three chunks of 512
    engine.add_request("seg-pages", TokensPrompt(prompt_token_ids=ids),
                       SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    seen, prev = [], {}
    while engine.has_unfinished_requests():
        engine.step()
        for req_id, blocks in managers[1].req_to_blocks.items():
            n, bs = sched.requests[req_id].num_computed_tokens, managers[1].block_size
            # pages leave at the next schedule: what this step's chunk needed may stay
            before = prev.get(req_id, 0)
            real = {i for i, b in enumerate(blocks) if not b.is_null}
            sinks = {t // bs for t in range(S)}
            kept = sinks | set(range(max(0, before - W + 1) // bs, len(blocks)))
            assert sinks <= real <= kept, (n, before, sorted(real))
            prev[req_id] = n
            global_real = sum(not b.is_null for b in managers[0].req_to_blocks[req_id])
            seen.append((n, len(real), global_real))
    assert seen and seen[-1][0] > 1300
    n, local_real, global_real = seen[-1]
    assert global_real == -(-n // managers[0].block_size)  # the global head keeps every page
    assert local_real <= 1 + -(-(W - 1) // managers[1].block_size) + 1


def test_mixed_batch_and_prefix_hit_match_the_request_alone(seg_llm):
    from tests.test_engine import PROMPTS

    prompt = long_prompt(20, key="24680")
    alone = _greedy(seg_llm, [prompt])[0]
    again = _greedy(seg_llm, [prompt])[0]  # prefix-cache hit on both groups
    batched = _greedy(seg_llm, [PROMPTS[0], prompt, PROMPTS[3]])
    assert again == alone and batched[1] == alone


def test_preempted_request_recomputes_to_the_same_tokens(seg_llm):
    """A pool that runs dry mid-decode (every free block taken from when all requests
    decode until one is preempted):
    vLLM's scheduler preempts, frees the request's pages in both groups and recomputes it
    later; the greedy tokens equal the same batch run without preemption."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, sched = seg_llm.llm_engine, _scheduler(seg_llm)
    pool = sched.kv_cache_manager.block_pool
    prompts = [list(range(3000 + 500 * i, 3000 + 500 * i + 300)) for i in range(3)]
    # 300-token prompts: each needs a new local page at 384 and a new global page at 512
    sp = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    reference = [list(o.outputs[0].token_ids) for o in seg_llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)]

    for i, p in enumerate(prompts):
        engine.add_request(f"preempt-{i}", TokensPrompt(prompt_token_ids=p), sp)
    got: dict[str, list[int]] = {}
    hostage: list[Any] = []
    preempted = set()
    try:
        while engine.has_unfinished_requests():
            running = list(sched.running)
            preempted |= {r.request_id for r in [*sched.running, *sched.waiting]
                          if r.num_preemptions}
            if preempted and hostage:
                pool.free_blocks(hostage)
                hostage = []
            elif not preempted and (hostage or (len(running) == 3 and all(
                    r.num_computed_tokens >= r.num_prompt_tokens for r in running))):
                # keep the pool dry: pages the windows free go too, so the next page a
                # request needs (its window entering a new page) is not there
                hostage += pool.get_new_blocks(pool.get_num_free_blocks())
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = list(out.outputs[0].token_ids)
    finally:
        if hostage:
            pool.free_blocks(hostage)
    assert preempted, "the dry pool preempted nothing"
    assert [got[f"preempt-{i}"] for i in range(3)] == reference


@pytest.mark.parametrize("extra, match", [
    ({"reuse": {"policy": "seed"}}, "segpaged supports reuse with reuse.policy 'selective'"),
])
def test_what_segpaged_does_not_carry_yet_is_refused_by_name(smollm2, extra, match):
    from redknot_vllm import engine_args
    from redknot_vllm.config import RedKnotConfigError

    with pytest.raises(RedKnotConfigError, match=match):
        engine_args(smollm2, head_config=_config(), segpaged=True, **extra)


def test_segpaged_refuses_a_full_tail_and_a_non_bool_flag():
    import dataclasses

    from redknot_vllm.config import RedKnotConfig, RedKnotConfigError

    tail = dataclasses.replace(_config(), tail_full_tokens=16)
    with pytest.raises(RedKnotConfigError, match="tail_full_tokens"):
        RedKnotConfig(head_config=tail, segpaged=True)
    with pytest.raises(RedKnotConfigError, match=r'\["segpaged"\] must be true or false'):
        RedKnotConfig.from_additional_config({"redknot": {"head_config": None,
                                                          "segpaged": "yes"}})
    inline = RedKnotConfig(head_config=_config(), segpaged=True).to_additional_config()
    assert RedKnotConfig.from_additional_config(inline).segpaged is True



# ----------------------------------------------------------------------- offline reuse
# Last in the module: stored documents would be reused by the prompts of the tests above.
def _doc_ids(llm: Any, reps: int) -> list[int]:
    from tests.conftest import _doc

    tok = llm.get_tokenizer()
    return tok(_doc("amber", "61524", reps), add_special_tokens=False)["input_ids"]


def _disk_store(llm: Any) -> Any:
    from redknot_vllm.kv_store import SegmentStore
    from redknot_vllm.reuse.keys import reuse_setup

    return SegmentStore(host_bytes=0, disk_dir=reuse_setup(llm.llm_engine.vllm_config).store_dir)


def test_reuse_in_place_is_exact_in_both_groups(seg_llm):
    """A document longer than a chunk and far beyond sink + window, precomputed (its local
    heads' KV gathered step by step as their pages leave the window), then reused at
    position 0: the spliced KV of both groups *is* the in-context KV, so the logprobs of
    the first token equal the same prompt computed (fp32)."""
    from redknot_vllm.reuse import precompute
    from tests.conftest import QUESTION, reuse_logprobs

    doc = _doc_ids(seg_llm, 40)
    assert len(doc) > COMMON["max_num_batched_tokens"] + S + W
    (digest,) = precompute(seg_llm, [doc], progress=False)
    seg = _disk_store(seg_llm).get(digest)
    assert seg is not None and seg.k.shape[:3] == (30, len(doc), 3)  # 1 global + 2 local
    assert seg.deviation is not None  # the probe behind a preface read the gathered KV too
    prompt = doc + seg_llm.get_tokenizer()(QUESTION.format(name="amber"),
                                           add_special_tokens=False)["input_ids"]

    (lp_reuse, toks_reuse, st), (lp_dense, toks_dense, _) = (
        reuse_logprobs(seg_llm, prompt, "auto"), reuse_logprobs(seg_llm, prompt, "off"))
    assert st["reused_tokens"] > len(doc) // 2 and st["cached_tokens"] == 0
    assert toks_reuse == toks_dense
    assert lp_reuse == pytest.approx(lp_dense, abs=1e-4)


def test_a_store_request_served_by_the_prefix_cache_is_not_stored(seg_llm, caplog):
    """Its local heads' KV before the hit was never in this engine's steps (those pages
    are freed): logged, nothing stored, never a segment with holes."""
    import logging

    from vllm import SamplingParams

    from redknot_vllm.kv_store import segment_file
    from redknot_vllm.reuse.keys import reuse_setup

    doc = _doc_ids(seg_llm, 30)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    seg_llm.generate([{"prompt_token_ids": doc}], sp, use_tqdm=False)  # fills the cache
    store = {"kv_transfer_params": {"redknot": {"store": True}}}
    with caplog.at_level(logging.ERROR):
        out = seg_llm.generate([{"prompt_token_ids": doc}],
                               SamplingParams(max_tokens=1, temperature=0.0, extra_args=store),
                               use_tqdm=False)[0]
    assert out.num_cached_tokens > 0  # the case under test: a prefix-cache hit
    setup = reuse_setup(seg_llm.llm_engine.vllm_config)
    assert not segment_file(setup.store_dir, setup.key(doc).digest()).exists()
    assert "not all computed in this engine's steps" in caplog.text
