"""SegPaged with the sparse FFN (its own module: its two engines start after the SegPaged
module's engine is gone)."""

from __future__ import annotations

from tests.conftest import COMMON, _engine, long_prompt
from tests.test_segpaged_engine import KV_BYTES, _config


def test_sparse_ffn_under_segpaged_keeps_the_same_tokens(smollm2, monkeypatch):
    """With nothing freed (W beyond the prompt), SegPaged only splits each layer in two:
    the sparse FFN's importance (the squared norm of the whole attention output, summed
    over the two halves) keeps the same tokens, so greedy output equals the unsplit
    engine's."""
    import dataclasses

    from vllm import SamplingParams

    from redknot_vllm import engine_args, request_stats

    wide = _config()
    wide = dataclasses.replace(wide, windows=tuple((w[0], 2048, 2048) for w in wide.windows))
    sparse = {"dense_until": 20, "mass_thresh": 0.5, "recent_n": 8}
    prompt = long_prompt(6, key="13579")
    # in process: two engine-core processes' start-up (importing vLLM again) was most of
    # this test's time
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    got = {}
    for seg in (False, True):
        gen = _engine(**engine_args(smollm2, head_config=wide, sparse_ffn=sparse,
                                    segpaged=seg, **{**COMMON, "kv_cache_memory_bytes": KV_BYTES}))
        llm = next(gen)
        try:
            out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0),
                               use_tqdm=False)[0]
            stats = request_stats(llm, [out.request_id])[out.request_id]
            got[seg] = (list(out.outputs[0].token_ids), stats["ffn_kept_fraction"])
        finally:
            next(gen, None)
    assert got[True][0] == got[False][0]
    assert got[True][1] == got[False][1] < 1.0
