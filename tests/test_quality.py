"""Quality tasks, metrics and the quality gate."""

from __future__ import annotations

import json
import math

import pytest

from redknot_vllm import quality
from redknot_vllm.quality import Outcome


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def test_cases_are_deterministic_and_fit_their_length(tokenizer):
    a = quality.make_cases(tokenizer, quality.TASKS, [1024, 2048], 3, seed=5)
    b = quality.make_cases(tokenizer, quality.TASKS, [1024, 2048], 3, seed=5)
    c = quality.make_cases(tokenizer, quality.TASKS, [1024, 2048], 3, seed=6)
    assert a == b and a != c
    assert len(a) == len(quality.TASKS) * 2 * 3
    for case in a:
        budget = case.tokens - quality.PROMPT_MARGIN
        assert budget - 40 <= len(case.prompt_ids) <= budget
        text = tokenizer.decode(case.prompt_ids)
        for ans in case.answers:
            # the answer is in the context (retrievable), except aggregation's item name
            # which is there several times
            assert ans in text, (case.task, ans)
            assert not text.rstrip().endswith(ans)
        # the context ends where the question starts (reuse stores the context only)
        question = tokenizer.decode(case.prompt_ids[len(case.context_ids):])
        assert question.startswith("\n") and "?" in question, (case.task, question)
        assert 0 < case.question_tokens < 40


def test_multidoc_evidence_is_never_only_in_the_first_document(tokenizer):
    cases = quality.make_cases(tokenizer, ["multidoc_qa"], [1024], 40, seed=0)
    firsts = 0
    for c in cases:
        text = tokenizer.decode(c.prompt_ids)
        doc = text.split(f"born in {c.answers[0]}")[0].rsplit("Document ", 1)[1].split(":")[0]
        firsts += doc == "1"
    assert firsts == 0


def test_code_lookup_is_a_repository_with_one_asked_function(tokenizer):
    """The code task (by name, outside the default set): source files with path headers,
    six ``<name>_limit()`` definitions, the asked one's value exactly once, never only in
    the first file."""
    assert "code_lookup" in quality.EXTRA_TASKS and "code_lookup" not in quality.TASKS
    cases = quality.make_cases(tokenizer, ["code_lookup"], [1024, 2048], 6, seed=0)
    assert cases == quality.make_cases(tokenizer, ["code_lookup"], [1024, 2048], 6, seed=0)
    for c in cases:
        budget = c.tokens - quality.PROMPT_MARGIN
        assert budget - 40 <= len(c.prompt_ids) <= budget
        text = tokenizer.decode(c.prompt_ids)
        ctx = tokenizer.decode(c.context_ids)
        assert ctx.count("# file: src/") == 6 and ctx.count("_limit():") == 6
        assert ctx.count(f"return {c.answers[0]}\n") == 1
        asked = text.rsplit("what does ", 1)[1].split("()", 1)[0]
        first = ctx.split("# file: src/", 2)[1]
        assert f"def {asked}():" in ctx and f"def {asked}():" not in first
        assert ctx.split(f"def {asked}():", 1)[1].split("\n")[1].strip() == \
            f"return {c.answers[0]}"


def test_bad_arguments_name_the_field(tokenizer):
    with pytest.raises(quality.QualityError, match="tasks: unknown"):
        quality.make_cases(tokenizer, ["nope"], [1024], 1, seed=0)
    with pytest.raises(quality.QualityError, match="lengths"):
        quality.make_cases(tokenizer, ["niah_single"], [100], 1, seed=0)


def test_scoring_and_metrics():
    assert quality.is_correct(" 12345. It is", ("12345",))
    assert not quality.is_correct(" 1234", ("12345",))
    assert quality.is_correct(" 111 and 222", ("222", "111"))
    lo, hi = quality.wilson(50, 100)
    assert lo < 0.5 < hi and math.isclose(lo + hi, 1.0)
    p = {1: math.log(0.6), 2: math.log(0.3)}
    assert quality.coarse_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    q = {1: math.log(0.3), 2: math.log(0.6)}
    assert quality.coarse_kl(p, q) > 0.1

    def out(task: str, i: int, ok: bool, text: str) -> Outcome:
        return Outcome(task, 2048, i, text, ok, p, 0.5, 0.3)

    dense = [out("a", i, i < 8, " x") for i in range(10)]
    rk = [out("a", i, i < 6, " x" if i < 9 else " y") for i in range(10)]
    (cell,) = quality.compare(dense, rk)
    assert (cell.dense_acc, cell.redknot_acc, cell.ratio) == (0.8, 0.6, 0.75)
    assert cell.agreement == 0.9 and cell.first_token_kl == 0.0
    s = quality.summarize([cell])
    assert s["avg_ratio"] == 0.75 and not s["meets_bar"] and s["flops_saved"] == {"2048": 0.5}
    with pytest.raises(quality.QualityError, match="same cases"):
        quality.compare(dense, rk[:-1] + [out("b", 9, True, "")])


# ---------------------------------------------------------------- the gate (engines)
GATE = dict(tasks=["niah_single", "niah_multikey"], lengths=[512], n=4)


@pytest.fixture()
def gate_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_REDKNOT_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.engine
def test_gate_passes_all_global_and_caches_it(smollm2, stock_llm, rk_global_llm, gate_cache):
    from redknot_vllm import HeadConfig, RedKnotConfig
    from redknot_vllm.gate import gate_key, gate_path, require_passed, run_gate

    cfg = RedKnotConfig(HeadConfig.shape(30, 3, 1.0, window=64))
    result = run_gate(smollm2, cfg, dense_llm=stock_llm, redknot_llm=rk_global_llm, **GATE)
    assert result.passed, result.message()
    assert result.summary["avg_ratio"] == 1.0 and result.dtype == "float32"
    path = gate_path(gate_key(result.model_fingerprint, cfg))
    assert json.loads(path.read_text())["passed"] is True
    assert require_passed(smollm2, cfg, "torch.float32").passed
    # another dtype is another fingerprint: no result
    from redknot_vllm.gate import GateRefused

    with pytest.raises(GateRefused, match="redknot gate"):
        require_passed(smollm2, cfg, "torch.bfloat16")


@pytest.mark.engine
def test_gate_refuses_a_weak_config_and_the_engine_obeys(smollm2, stock_llm, rk_local_llm,
                                                         local_head_config, gate_cache):
    from redknot_vllm import RedKnotConfig
    from redknot_vllm.gate import GateRefused, require_passed, run_gate

    cfg = RedKnotConfig(local_head_config)
    result = run_gate(smollm2, cfg, dense_llm=stock_llm, redknot_llm=rk_local_llm,
                      tasks=["niah_multikey"], lengths=[1024], n=4)
    # 80% local heads with a 64-token window cannot retrieve a code hundreds of tokens
    # back (1K-token prompts: 2K ones took 85 s on two CPU cores for the same verdict)
    assert not result.passed, result.message()
    assert result.summary["avg_ratio"] < 0.5, result.message()
    assert "REFUSED" in result.message()
    with pytest.raises(GateRefused, match="failed its gate"):
        require_passed(smollm2, cfg, "float32")


@pytest.mark.engine
def test_engine_with_require_gate_refuses_to_start_without_a_gate(smollm2, gate_cache,
                                                                  capfd):
    from vllm import LLM

    from redknot_vllm import HeadConfig, engine_args
    from tests.conftest import COMMON

    hc = HeadConfig.shape(30, 3, 0.5, window=128, seed=3)
    with pytest.raises(Exception, match=r"initialization failed|require_gate"):
        LLM(**engine_args(smollm2, head_config=hc, require_gate=True, **COMMON))
    captured = capfd.readouterr()
    assert "require_gate: no quality-gate result" in captured.out + captured.err
    assert "redknot gate" in captured.out + captured.err


def test_mcnemar_p_of_paired_outcomes():
    from redknot_vllm.quality import QualityError, mcnemar_p

    assert mcnemar_p([True, False], [True, False]) == 1.0  # no discordant case
    # 6 discordant cases all one way: 2 * 0.5**6
    assert abs(mcnemar_p([True] * 6 + [False], [False] * 6 + [False]) - 2 / 64) < 1e-12
    # a 3:3 split is no evidence either way
    assert mcnemar_p([True] * 3 + [False] * 3, [False] * 3 + [True] * 3) == 1.0
    with pytest.raises(QualityError):
        mcnemar_p([True], [True, False])
