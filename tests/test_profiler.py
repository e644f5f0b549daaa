"""Head profiler on the real SmolLM2 with tiny settings: probe exactness, scores, classify."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from redknot_vllm.cli import main as cli_main
from redknot_vllm.head_config import HeadClass, HeadConfig
from redknot_vllm.profiler import (
    METHOD,
    AttentionProbe,
    ProfileError,
    ProfileScores,
    classify,
    combined_scores,
    load_model,
    load_scores,
    load_texts,
    profile,
    profile_heads,
    synthetic_texts,
)
from redknot_vllm.profiler.samples import Tokens, needle_sample

TINY = dict(windows=(32, 64), sink=4, max_tokens=256, n_texts=2, n_retrieval=2, seed=0,
            progress=False)
L, H = 30, 3


@pytest.fixture(scope="module")
def scores(smollm2: str) -> ProfileScores:
    return profile_heads(smollm2, **TINY)


def test_probe_attention_matches_sdpa_and_eager(smollm2: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # function level, GQA (9 query heads over 3 KV heads), against transformers' SDPA
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 40, 64), torch.randn(2, 3, 40, 64), torch.randn(2, 3, 40, 64)

    class Module:
        layer_idx, scaling, num_key_value_groups, is_causal, training = 0, 0.125, 3, True, False

    ours, _ = AttentionProbe()(Module(), q, k, v, None)
    ref, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.125)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)

    # whole model: bit-equal to eager; SDPA (the default) differs by fp32 kernel noise only
    ids = torch.randint(100, 49000, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = {impl: load_model(smollm2, impl)(ids).logits
                  for impl in ("redknot_probe", "eager", "sdpa")}
    torch.testing.assert_close(logits["redknot_probe"], logits["eager"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits["redknot_probe"], logits["sdpa"], atol=1e-3, rtol=1e-5)


def test_row_maps_equal_full_maps(smollm2: str):
    """The retrieval path (fused output, maps for a few rows) sees the same probabilities
    (up to the fused-vs-eager fp32 noise carried through the layers)."""
    probe = AttentionProbe()
    model = load_model(smollm2, probe=probe)
    ids = torch.randint(100, 49000, (1, 120), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([0, 57, 119])
    full: dict[int, torch.Tensor] = {}
    part: dict[int, torch.Tensor] = {}
    probe.run(model, ids, lambda li, p: full.__setitem__(li, p[0, :, rows].clone()))
    probe.run(model, ids, lambda li, p: part.__setitem__(li, p[0].clone()), rows=rows)
    assert sorted(full) == sorted(part) == list(range(L))
    for li in full:
        torch.testing.assert_close(part[li], full[li], atol=1e-5, rtol=0)


def test_scores_shapes_and_ranges(scores: ProfileScores):
    assert (scores.num_layers, scores.num_kv_heads, scores.windows) == (L, H, (32, 64))
    mats = [scores.prefix_shift, scores.retrieval, *scores.edge_mass.values()]
    for m in mats:
        assert len(m) == L and all(len(row) == H for row in m)
        assert all(0.0 <= x <= 1.0 for row in m for x in row)
    assert sorted(scores.edge_mass) == [32, 64]
    # every score carries signal on a real model
    assert all(max(max(r) for r in m) > 0.05 for m in mats)
    assert scores.params["edge_mass_texts"] == {"32": 2, "64": 2}
    assert scores.params["n_texts"] == 2 and scores.params["n_retrieval"] == 2
    assert len(scores.model_fingerprint) == 64


def test_edge_mass_shrinks_as_window_grows(scores: ProfileScores):
    for li in range(L):
        for h in range(H):
            assert scores.edge_mass[64][li][h] <= scores.edge_mass[32][li][h] + 1e-6, (li, h)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_classify_counts(scores: ProfileScores, fraction: float):
    hc = classify(scores, fraction, window=64)
    counts = hc.counts()
    assert counts["global"] == round(L * H * fraction)
    assert counts["local"] == L * H - counts["global"]
    for li in range(L):
        for h in range(H):
            local = hc.classes[li][h] is HeadClass.LOCAL
            assert hc.windows[li][h] == (64 if local else -1)
            assert hc.sinks[li][h] == 4


def test_classify_picks_highest_combined(scores: ProfileScores):
    hc = classify(scores, 0.2, window=32)
    comb = combined_scores(scores, 32)
    glob = [comb[li][h] for li in range(L) for h in range(H)
            if hc.classes[li][h] is HeadClass.GLOBAL]
    loc = [comb[li][h] for li in range(L) for h in range(H)
           if hc.classes[li][h] is HeadClass.LOCAL]
    assert min(glob) >= max(loc)
    assert max(glob) == 1.0  # each score is max-normalised


def test_classify_globals_per_layer_keeps_locals_in_every_layer(scores: ProfileScores):
    """SegPaged's configs: each layer's top head by the combined score global, the others
    local, whatever the model-wide ranking says."""
    hc = classify(scores, 0.0, window=32, globals_per_layer=1)
    comb = combined_scores(scores, 32)
    for li in range(L):
        glob = [h for h in range(H) if hc.classes[li][h] is HeadClass.GLOBAL]
        assert glob == [max(range(H), key=lambda h: (comb[li][h], -h))]
    assert hc.counts()["local"] == L * (H - 1)
    with pytest.raises(ProfileError, match="not both"):
        classify(scores, 0.2, window=32, globals_per_layer=1)
    with pytest.raises(ProfileError, match="globals_per_layer"):
        classify(scores, 0.0, window=32, globals_per_layer=H + 1)


def test_json_round_trip(scores: ProfileScores, tmp_path: Path):
    a, b = classify(scores, 0.2, window=64), classify(scores, 0.2, window=64)
    assert a.content_hash() == b.content_hash()
    path = tmp_path / "profile.json"
    a.save_json(path)
    loaded = HeadConfig.from_json(path)
    assert loaded.content_hash() == a.content_hash()
    prov = loaded.info["provenance"]
    assert prov["method"] == METHOD and prov["model_fingerprint"] == scores.model_fingerprint
    assert prov["parameters"]["global_fraction"] == 0.2
    assert prov["parameters"]["window"] == 64 and prov["parameters"]["windows"] == [32, 64]
    assert set(loaded.info["profiling_meta"]["scores"]) == {
        "prefix_shift", "edge_mass", "retrieval", "combined"}
    back = load_scores(path)
    assert back == scores
    assert ProfileScores.from_dict(json.loads(json.dumps(scores.to_dict()))) == scores
    # a sweep re-classifies from the JSON and gets the same heads
    assert classify(back, 0.2, window=64).content_hash() == a.content_hash()
    assert classify(back, 0.5, window=32).content_hash() == \
        classify(scores, 0.5, window=32).content_hash()


def test_weights_change_the_ranking(scores: ProfileScores):
    only_retrieval = classify(scores, 0.1, 64,
                              weights={"prefix_shift": 0, "edge_mass": 0, "retrieval": 1})
    top = max(((li, h) for li in range(L) for h in range(H)),
              key=lambda lh: scores.retrieval[lh[0]][lh[1]])
    assert only_retrieval.classes[top[0]][top[1]] is HeadClass.GLOBAL
    with pytest.raises(ProfileError, match=r"weights has unknown key\(s\) \['edge'\]"):
        classify(scores, 0.1, 64, weights={"edge": 1})


@pytest.mark.parametrize("kwargs,message", [
    (dict(global_fraction=1.5, window=64), "global_fraction (--global-fraction) is 1.5"),
    (dict(global_fraction=-0.1, window=64), "global_fraction (--global-fraction) is -0.1"),
    (dict(global_fraction=0.2, window=100), "window (--window) is 100, which was not profiled"),
])
def test_classify_rejects_bad_arguments(scores: ProfileScores, kwargs, message):
    with pytest.raises(ProfileError) as e:
        classify(scores, **kwargs)
    assert message in str(e.value)
    if kwargs["window"] == 100:
        assert "[32, 64]" in str(e.value)


def test_profile_rejects_bad_arguments_before_profiling(smollm2: str, tmp_path: Path):
    out = tmp_path / "x.json"
    with pytest.raises(ProfileError, match=r"model_dir \(MODEL\) .* is not a folder"):
        profile(tmp_path / "nope", out)
    with pytest.raises(ProfileError, match=r"window \(--window\) is 1000.*\[256, 512, 1024"):
        profile(smollm2, out, window=1000)
    with pytest.raises(ProfileError, match=r"global_fraction"):
        profile(smollm2, out, global_fraction=2)
    with pytest.raises(ProfileError, match=r"windows \(--windows\)"):
        profile(smollm2, out, windows=(0, 64), window=64)
    with pytest.raises(ProfileError, match=r"max_tokens \(--max-tokens\) is 8"):
        profile_heads(smollm2, max_tokens=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match=r"texts \(--texts\): .*empty holds no non-empty"):
        profile_heads(smollm2, tmp_path / "empty")
    with pytest.raises(ProfileError, match=r"texts \(--texts\): .*missing does not exist"):
        profile_heads(smollm2, tmp_path / "missing")
    assert not out.exists()


def test_load_texts(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "d" / "skip.md").write_text("not a text")
    assert load_texts(tmp_path / "d") == ["first", "second"]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert load_texts(jl) == ["one", "two"]
    jl.write_text('{"body": "one"}\n')
    with pytest.raises(ProfileError, match=r"line 1 has no string \"text\" field"):
        load_texts(jl)


def test_synthetic_texts_are_deterministic():
    a, b = synthetic_texts(2, seed=0, min_chars=2000), synthetic_texts(2, seed=0, min_chars=2000)
    assert a == b and a[0] != a[1] and len(a[0]) >= 2000 and "\n\n" in a[0]
    assert synthetic_texts(1, seed=1, min_chars=2000)[0] != a[0]


def test_needle_sample_layout(smollm2: str):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(smollm2)
    tok = Tokens(raw)
    for i in range(3):
        ns = needle_sample(tok, random.Random(i), 300)
        assert len(ns.ids) <= 300
        number = raw.decode(ns.ids[ns.needle[0]:ns.needle[-1] + 1]).strip()
        assert len(number) == 5 and number.isdigit()
        assert ns.needle[-1] < 0.6 * len(ns.ids) + 20
        # the queries predict exactly the answer " {number}."
        answer = raw.decode(ns.ids[ns.queries[0] + 1:])
        assert answer.strip() == f"{number}." and ns.queries[-1] == len(ns.ids) - 2
        assert raw.decode(ns.ids[:ns.queries[0] + 1]).endswith("archive is")


def test_cli_profile_with_jsonl_texts(smollm2: str, tmp_path: Path, capsys):
    texts = tmp_path / "calib.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n"
                             for t in synthetic_texts(2, seed=5, min_chars=800)))
    out = tmp_path / "sub" / "head.json"
    cli_main(["profile", "smollm2", "--out", str(out), "--texts", str(texts),
              "--max-tokens", "128", "--windows", "32,64", "--window", "32", "--n-texts", "2",
              "--n-retrieval", "1", "--global-fraction", "0.1", "--no-progress"])
    hc = HeadConfig.from_json(out)
    assert hc.counts()["global"] == 9
    assert hc.info["provenance"]["parameters"]["calibration"] == str(texts)
    printed = capsys.readouterr().out
    assert "90 KV heads: 9 global, 81 local" in printed and "layer" in printed
    with pytest.raises(SystemExit, match=r"redknot profile: global_fraction"):
        cli_main(["profile", "smollm2", "--out", str(out), "--global-fraction", "3"])
    with pytest.raises(SystemExit):
        cli_main(["profile", "smollm2", "--out", str(out), "--windows", "32,x"])


def test_needle_sample_with_distractors(smollm2: str):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(smollm2)
    tok = Tokens(raw)
    ns = needle_sample(tok, random.Random(5), 600, distractors=3)
    text = raw.decode(ns.ids)
    assert len(ns.ids) <= 600 and text.count("The secret code for the") == 5  # 4 + question
    number = raw.decode(ns.ids[ns.needle[0]:ns.needle[-1] + 1]).strip()
    assert raw.decode(ns.ids[ns.queries[0] + 1:]).strip() == f"{number}."
    # without distractors the sample is what it always was (shipped profiles reproduce)
    assert needle_sample(tok, random.Random(5), 600).ids == needle_sample(
        tok, random.Random(5), 600, distractors=0).ids


def test_long_profile_adds_scores_and_classifies_with_them(smollm2: str, scores, tmp_path):
    from redknot_vllm.profiler import profile_long

    long = profile_long(smollm2, scores, long_tokens=400, windows=(32, 64), n_texts=1,
                        n_needles=1, distractors=2, rows=16, device="cpu", progress=False)
    assert sorted(long.edge_mass_long) == [32, 64] and long.retrieval_long is not None
    for m in (*long.edge_mass_long.values(), long.retrieval_long):
        assert len(m) == L and all(len(r) == H and all(0 <= x <= 1 for x in r) for r in m)
    # a wider window drops less of the long context
    assert sum(map(sum, long.edge_mass_long[64])) <= sum(map(sum, long.edge_mass_long[32]))
    hc = classify(long, 0.2, 32)
    assert "edge_mass_long" in hc.info["profiling_meta"]["scores"]
    path = tmp_path / "long.json"
    hc.save_json(path)
    back = load_scores(path)
    assert back.edge_mass_long == long.edge_mass_long and back.long_params["long_tokens"] == 400
    assert combined_scores(back, 32) == combined_scores(long, 32) != combined_scores(scores, 32)


def test_classify_makes_the_next_ranked_heads_retrieval(scores: ProfileScores):
    rb = {"top_k": 8, "block": 64, "window": 1024}
    plain = classify(scores, 0.2, 64)
    hc = classify(scores, 0.2, 64, retrieval_fraction=0.1, retrieval_blocks=rb)
    c = hc.counts()
    total = scores.num_layers * scores.num_kv_heads
    assert c["global"] == plain.counts()["global"] and c["retrieval"] == round(0.1 * total)
    assert hc.retrieval_blocks.to_dict() == rb
    for li in range(scores.num_layers):  # retrieval heads were local before, globals stay
        for h in range(scores.num_kv_heads):
            if hc.classes[li][h].value == "retrieval":
                assert plain.classes[li][h].value == "local"
    with pytest.raises(ProfileError, match="retrieval_blocks"):
        classify(scores, 0.2, 64, retrieval_fraction=0.1)


def test_classify_gives_the_next_ranked_heads_a_wider_window(scores: ProfileScores):
    plain = classify(scores, 0.2, 32)
    hc = classify(scores, 0.2, 32, wide_fraction=0.3, wide_window=64)
    total = scores.num_layers * scores.num_kv_heads
    wide = [(li, h) for li in range(L) for h in range(H) if hc.windows[li][h] == 64]
    assert len(wide) == round(0.3 * total) and hc.counts() == plain.counts()
    comb = combined_scores(scores, 32)
    narrow = [comb[li][h] for li in range(L) for h in range(H) if hc.windows[li][h] == 32]
    assert min(comb[li][h] for li, h in wide) >= max(narrow)  # ranked above the narrow ones
    with pytest.raises(ProfileError, match="wide_window"):
        classify(scores, 0.2, 32, wide_fraction=0.3, wide_window=32)
