"""The quality harness's bookkeeping (benchmarks/quality.py): cache serving, sweep grid."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks/quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _outcome(task: str, tokens: int, i: int) -> dict:
    return {"task": task, "tokens": tokens, "index": i, "text": f"{task}{i}", "correct": True,
            "first_logprobs": {"1": -0.1}, "flops_saved": None, "ffn_kept_fraction": None}


def _cache(harness, workdir: Path, tasks, lengths, n, head=None, attention=None) -> str:
    spec, key = harness._spec("m", head, None, tasks, lengths, n, 0, None, attention)
    (workdir / f"spec-{key}.json").write_text(json.dumps({**spec, "out": "elsewhere"}))
    (workdir / f"run-{key}.json").write_text(json.dumps({
        "engine_start_s": 1.0, "generate_s": 2.0, "prompt_tokens": {str(t): t for t in lengths},
        "outcomes": [_outcome(a, t, i) for a in tasks for t in lengths for i in range(n)]}))
    return key


def test_a_run_is_served_from_a_cached_run_over_more_cases(harness, tmp_path):
    head = {"tail_full_tokens": 128, "provenance": {"date": "x"}}
    src = _cache(harness, tmp_path, ["a", "b"], [8, 16], 5, head=head)
    # the informational keys of a config do not matter; the first n cases are the same
    outs = harness.run_engine(tmp_path, "m", {**head, "provenance": {"date": "y"}}, None,
                              ["b"], [16], 3, 0, "rk")
    assert [(o.task, o.tokens, o.index) for o in outs] == [("b", 16, i) for i in range(3)]
    served = json.loads(next(p for p in tmp_path.glob("run-*.json")
                             if src not in p.name).read_text())
    assert served["from_run"] == src and served["prompt_tokens"] == {"16": 16}


@pytest.mark.parametrize("ask", [
    dict(tasks=["c"], lengths=[8], n=3),  # a task the cache lacks
    dict(tasks=["a"], lengths=[32], n=3),  # a length it lacks
    dict(tasks=["a"], lengths=[8], n=6),  # more cases than it has
    dict(tasks=["a"], lengths=[8], n=3, attention="torch"),  # another attention
    dict(tasks=["a"], lengths=[8], n=3, ttft_tokens=[8]),  # a timed run is never served
])
def test_a_cached_run_serves_only_a_subset_of_itself(harness, tmp_path, ask):
    _cache(harness, tmp_path, ["a", "b"], [8, 16], 5)
    spec, key = harness._spec("m", None, None, ask["tasks"], ask["lengths"], ask["n"], 0,
                              ask.get("ttft_tokens"), ask.get("attention"))
    assert harness._from_superset(tmp_path, spec, tmp_path / f"run-{key}.json") is None
    assert not (tmp_path / f"run-{key}.json").exists()


def test_sweep_points_parse_and_keep_older_names(harness):
    assert harness.parse_point("0.25:1024") == (0.25, 1024, None, None, 0)
    assert harness.parse_point("0.25:1024:128:-:2") == (0.25, 1024, 128, None, 2)
    assert harness.parse_point("0.3:2048:128:64") == (0.3, 2048, 128, 64, 0)
    assert harness.point_name(0.15, 1024, 128, None, 0) == "profiled-g0.15-w1024-t128"
    assert harness.point_name(0.25, 1024, 128, 64, 2) == "profiled-g0.25-w1024-t128-s64-d2"
    with pytest.raises(SystemExit, match="f:W"):
        harness.parse_point("0.25")


def test_the_attention_switch_names_its_variable(monkeypatch):
    from redknot_vllm import envs

    monkeypatch.setenv("VLLM_REDKNOT_ATTENTION", "triton")
    with pytest.raises(ValueError, match="VLLM_REDKNOT_ATTENTION"):
        envs.attention_impl()
    monkeypatch.setenv("VLLM_REDKNOT_ATTENTION", "torch")
    assert envs.attention_impl() == "torch"
