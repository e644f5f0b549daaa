"""RedKnot inside real vLLM engines on CPU (SmolLM2-135M-Instruct, fp32)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.conftest import COMMON, _engine, long_prompt

pytestmark = pytest.mark.engine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    long_prompt(30),  # ~1,500 tokens: three chunked-prefill steps of 512
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
    long_prompt(12, key="90210"),  # ~600 tokens
    "1, 2, 3, 4,",
]


def _greedy(llm, prompts, n=16):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def test_all_global_is_token_identical_to_stock(stock_llm, rk_global_llm):
    # one mixed batch (prefills of several lengths interleave with decodes), then each
    # prompt alone, then the long one again (prefix-cache hit on all but its tail)
    batch_stock, _ = _greedy(stock_llm, PROMPTS)
    batch_rk, outs = _greedy(rk_global_llm, PROMPTS)
    assert len(outs[2].prompt_token_ids) > 3 * 400
    assert batch_rk == batch_stock
    for p in PROMPTS[:3]:
        assert _greedy(rk_global_llm, [p])[0] == _greedy(stock_llm, [p])[0]
    again, _ = _greedy(rk_global_llm, [PROMPTS[2]])
    assert again[0] == batch_stock[2]


def test_plugin_is_active_in_the_engine_core_process(rk_global_llm):
    info = rk_global_llm.collective_rpc("redknot_worker_info")[0]
    assert info["pid"] != os.getpid()
    assert info["model_class"] == "RedKnotLlamaForCausalLM"
    assert info["redknot_attention_layers"] == 30
    assert info["runtime"] is True and info["sparse_ffn_layers"] == 0


def test_all_global_accounts_zero_saving(rk_global_llm):
    from redknot_vllm import request_stats

    _, outs = _greedy(rk_global_llm, [PROMPTS[4]], n=2)
    stats = request_stats(rk_global_llm, [outs[0].request_id])[outs[0].request_id]
    assert stats["prompt_tokens"] == len(outs[0].prompt_token_ids)
    assert stats["flops_saved"] == 0.0 and stats["ffn_kept_fraction"] == 1.0
    assert stats["flops_dense"] == stats["flops_redknot"] > 0


def test_local_heads_match_independent_hf_reference(smollm2, rk_local_llm, local_head_config):
    from tests.hf_reference import greedy_reference

    prompt = long_prompt(24)
    got, outs = _greedy(rk_local_llm, [prompt], n=12)
    ids = list(outs[0].prompt_token_ids)
    assert len(ids) > 2 * COMMON["max_num_batched_tokens"]  # chunked in vLLM
    assert got[0] == greedy_reference(smollm2, local_head_config, ids, 12)


@pytest.fixture(scope="module")
def rk_tail_llm(smollm2: str) -> Any:
    """80% local heads, the prompt's last 24 tokens attending fully on every head."""
    from redknot_vllm import HeadConfig, engine_args

    hc = HeadConfig.shape(30, 3, 0.2, window=64, sink=4, seed=0, tail_full_tokens=24)
    yield from _engine(**engine_args(smollm2, head_config=hc, **COMMON))


def test_full_tail_matches_independent_hf_reference(smollm2, rk_tail_llm):
    """One chunk (the prompt fits max_num_batched_tokens): the tail is the question."""
    from redknot_vllm import HeadConfig, request_stats
    from tests.hf_reference import greedy_reference

    hc = HeadConfig.shape(30, 3, 0.2, window=64, sink=4, seed=0, tail_full_tokens=24)
    prompt = long_prompt(4)
    got, outs = _greedy(rk_tail_llm, [prompt], n=12)
    ids = list(outs[0].prompt_token_ids)
    assert 200 < len(ids) <= COMMON["max_num_batched_tokens"]
    assert got[0] == greedy_reference(smollm2, hc, ids, 12)
    saved = request_stats(rk_tail_llm, [outs[0].request_id])[outs[0].request_id]
    assert 0 < saved["flops_saved"] < 0.5


def test_local_heads_invariant_to_batching_and_prefix_cache(rk_local_llm):
    prompt = long_prompt(25, key="55555")
    alone, _ = _greedy(rk_local_llm, [prompt])
    cached, _ = _greedy(rk_local_llm, [prompt])  # prefix-cache hit
    batched, _ = _greedy(rk_local_llm, [PROMPTS[0], prompt, PROMPTS[4]])
    assert cached[0] == alone[0] and batched[1] == alone[0]


def test_demo_config_on_4k_prompt_is_sensible_and_saves_flops(rk_demo_llm):
    from transformers import AutoTokenizer

    from redknot_vllm import request_stats
    from redknot_vllm.demo import build_prompt

    tok = AutoTokenizer.from_pretrained(rk_demo_llm.llm_engine.model_config.model)
    demo = build_prompt(tok, 4000)
    got, outs = _greedy(rk_demo_llm, [demo.text], n=16)
    text = outs[0].outputs[0].text
    assert len(outs[0].prompt_token_ids) >= 3900
    assert text.strip() and sum(c.isprintable() or c.isspace() for c in text) == len(text)
    assert len(set(got[0])) >= 4  # not one token repeated
    stats = request_stats(rk_demo_llm, [outs[0].request_id])[outs[0].request_id]
    assert stats["flops_saved"] > 0.1
    assert 0.0 < stats["ffn_kept_fraction"] < 1.0


def test_misfit_head_config_stops_engine_start(smollm2, capfd):
    from vllm import LLM

    from redknot_vllm import HeadConfig

    bad = HeadConfig.shape(28, 3, 0.5, window=64)  # the model has 30 layers
    # bypass engine_args' up-front check to exercise the worker-side validation
    with pytest.raises(Exception, match=r"initialization failed|num_layers"):
        LLM(model=smollm2, hf_overrides={"architectures": ["RedKnotLlamaForCausalLM"]},
            additional_config={"redknot": {"head_config": bad.to_dict()}}, **COMMON)
    captured = capfd.readouterr()
    assert "num_layers is 28 but the model has 30 decoder layers" in captured.out + captured.err


def _retrieval_config():
    """20% global, 40% block-sparse retrieval (top 2 blocks of 16, window 32), 40% local."""
    from redknot_vllm import HeadConfig

    d = HeadConfig.shape(30, 3, 0.2, window=64, sink=4, seed=0, tail_full_tokens=16).to_dict()
    n = 0
    for li, row in enumerate(d["kv_head_classification"]):
        for h, c in enumerate(row):
            if c == "local" and n % 2 == 0:
                row[h] = "retrieval"
                d["kv_head_max_distance"][li][h] = -1
            n += c == "local"
    d["retrieval_blocks"] = {"top_k": 2, "block": 16, "window": 32}
    return HeadConfig.from_dict(d, source="<retrieval test>")


@pytest.fixture(scope="module")
def rk_retrieval_llm(smollm2: str) -> Any:
    from redknot_vllm import engine_args

    yield from _engine(**engine_args(smollm2, head_config=_retrieval_config(), **COMMON))


def test_retrieval_heads_match_independent_hf_reference(smollm2, rk_retrieval_llm):
    """Block-sparse retrieval heads through the whole engine (plan, head regrouping, torch
    path, accounting) against HF transformers with the same per-query masks."""
    from redknot_vllm import request_stats
    from tests.hf_reference import greedy_reference

    hc = _retrieval_config()
    assert 30 <= hc.counts()["retrieval"] <= 40
    prompt = long_prompt(4)
    got, outs = _greedy(rk_retrieval_llm, [prompt], n=12)
    ids = list(outs[0].prompt_token_ids)
    assert 200 < len(ids) <= COMMON["max_num_batched_tokens"]  # one chunk, as in HF
    assert got[0] == greedy_reference(smollm2, hc, ids, 12)
    saved = request_stats(rk_retrieval_llm, [outs[0].request_id])[outs[0].request_id]
    assert 0 < saved["flops_saved"] < 0.6
