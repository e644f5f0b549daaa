"""Head-aware PD on CPU: a prefill engine and a decode engine (SegPaged, SmolLM2, every layer
1 global + 2 local heads, W=64, S=4) on one host, sharing a folder. The decode engine's
greedy tokens equal the prefill engine's own (co-located); a missing or corrupt transfer
makes it compute the prompt, logged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import COMMON, _engine, long_prompt
from tests.test_segpaged_engine import KV_BYTES, S, W, _config

N_NEW = 10


@pytest.fixture(scope="module")
def pd_pair(smollm2: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Any, Any, Path]]:
    """Each engine core in a process of its own, as in a deployment (and because vLLM's
    KV connector is one per process: two in-process engines would share the second's)."""
    from redknot_vllm import engine_args

    folder = tmp_path_factory.mktemp("pd")
    gens = [_engine(**engine_args(
        smollm2, head_config=_config(), segpaged=True,
        pd={"role": role, "dir": str(folder), "timeout_s": 0.5},
        **{**COMMON, "kv_cache_memory_bytes": KV_BYTES})) for role in ("producer", "consumer")]
    prefill, decode = (next(g) for g in gens)
    yield prefill, decode, folder
    for g in reversed(gens):
        next(g, None)


def _ids(llm: Any, reps: int, key: str) -> list[int]:
    return llm.get_tokenizer()(long_prompt(reps, key=key))["input_ids"]


def _send(prefill: Any, ids: list[int]) -> dict[str, Any]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0,
                        extra_args={"kv_transfer_params": {"redknot_pd": {"send": True}}})
    out = prefill.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
    assert out.kv_transfer_params and "redknot_pd" in out.kv_transfer_params
    return out.kv_transfer_params


def _decode(llm: Any, ids: list[int], params: dict[str, Any] | None = None,
            salt: str | None = None) -> Any:
    from vllm import SamplingParams

    extra = {} if params is None else {"kv_transfer_params": params}
    p: dict[str, Any] = {"prompt_token_ids": ids}
    if salt:
        p["cache_salt"] = salt
    sp = SamplingParams(max_tokens=N_NEW, temperature=0, extra_args=extra)
    return llm.generate([p], sp, use_tqdm=False)[0]


def test_disaggregated_tokens_equal_the_colocated_engine(pd_pair):
    """A prompt of two chunks, far beyond sink + window: the decode engine loads all but its
    last token and generates the prefill engine's own greedy tokens."""
    from redknot_vllm.pd import read_transfer, transfer_file

    prefill, decode, folder = pd_pair
    ids = _ids(prefill, 20, "55123")
    assert len(ids) > COMMON["max_num_batched_tokens"]
    colocated = list(_decode(prefill, ids, salt="colocated").outputs[0].token_ids)
    params = _send(prefill, ids)
    tensors, _ = read_transfer(transfer_file(folder, params["redknot_pd"]["transfer_id"]))
    # the global head every position, the local heads sinks + the last W only
    assert tensors["global_k"].shape[:3] == (30, len(ids), 1)
    assert tensors["local_k"].shape[:3] == (30, S + W, 2)
    out = _decode(decode, ids, params)
    assert out.num_cached_tokens >= len(ids) - 1  # loaded, not computed
    assert list(out.outputs[0].token_ids) == colocated


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_a_failed_transfer_is_computed(pd_pair, fault):
    """Missing: the decode engine waits ``timeout_s``, then computes; corrupt: its worker's
    checksum fails, the blocks go back to vLLM as load errors and vLLM recomputes them."""
    from redknot_vllm.pd import transfer_file

    prefill, decode, folder = pd_pair
    ids = _ids(prefill, 12, f"4{len(fault)}871")
    colocated = list(_decode(prefill, ids, salt="colocated").outputs[0].token_ids)
    params = _send(prefill, ids)
    path = transfer_file(folder, params["redknot_pd"]["transfer_id"])
    if fault == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF  # a flipped byte in the KV
        path.write_bytes(bytes(data))
    out = _decode(decode, ids, params)
    assert list(out.outputs[0].token_ids) == colocated
    assert out.num_cached_tokens < len(ids) - 1  # computed, not loaded


def test_pd_options_are_validated(smollm2, tmp_path):
    from redknot_vllm import engine_args
    from redknot_vllm.config import RedKnotConfigError

    with pytest.raises(RedKnotConfigError, match=r"pd\.role"):
        engine_args(smollm2, head_config=_config(), pd={"role": "both", "dir": str(tmp_path)})
    with pytest.raises(RedKnotConfigError, match="unknown keys"):
        engine_args(smollm2, head_config=_config(), pd={"role": "producer", "dir": "x",
                                                       "port": 1})
    with pytest.raises(RedKnotConfigError, match="no reuse"):
        engine_args(smollm2, head_config=_config(), reuse=True,
                    pd={"role": "producer", "dir": str(tmp_path)})
    args = engine_args(smollm2, head_config=_config(), segpaged=True,
                       pd={"role": "consumer", "dir": str(tmp_path)})
    ktc = args["kv_transfer_config"]
    assert ktc["kv_role"] == "kv_consumer" and ktc["kv_load_failure_policy"] == "recompute"


class _Req:
    def __init__(self, rid: str, ids: list[int], params: dict[str, Any]) -> None:
        self.request_id, self.prompt_token_ids = rid, ids
        self.kv_transfer_params = {"redknot_pd": params}


def test_consumer_scheduler_waits_then_computes_and_checks_what_it_loads(tmp_path, caplog):
    """The scheduler half without an engine: a transfer not there yet is asked for again
    (None) until ``timeout_s``, then computed (logged); a file of another prompt or engine
    layout is never loaded; a flipped byte fails the checksum."""
    import logging
    import time

    import torch

    from redknot_vllm.pd import (
        PDConfig,
        PDScheduler,
        read_transfer,
        token_digest,
        transfer_file,
        write_transfer,
    )

    cfg = PDConfig.from_dict({"role": "consumer", "dir": str(tmp_path), "timeout_s": 0.2})
    sched = PDScheduler(cfg, "layout-a")
    ids = list(range(100, 140))
    tid = "0123456789abcdef0123456789abcdef"
    with caplog.at_level(logging.WARNING, logger="redknot_vllm"):
        assert sched.matched(_Req("r1", ids, {"transfer_id": tid}), 0) == (None, False)
        time.sleep(0.25)
        assert sched.matched(_Req("r1", ids, {"transfer_id": tid}), 0) == (0, False)
        assert sched.matched(_Req("r1", ids, {"transfer_id": tid}), 0) == (0, False)  # stays
        assert sched.matched(_Req("r2", ids, {"transfer_id": "../etc"}), 0) == (0, False)
    assert "did not arrive within" in caplog.text and "no valid transfer_id" in caplog.text
    t = {"global_k": torch.randn(2, 40, 1, 4), "global_v": torch.randn(2, 40, 1, 4)}
    path = transfer_file(tmp_path, tid)
    write_transfer(path, t, {"tokens": "40", "digest": token_digest(ids), "layout": "layout-a"})
    assert sched.matched(_Req("r3", ids, {"transfer_id": tid}), 0) == (39, False)
    assert sched.matched(_Req("r4", ids[:-1] + [7], {"transfer_id": tid}), 0) == (0, False)
    assert PDScheduler(cfg, "layout-b").matched(_Req("r5", ids, {"transfer_id": tid}),
                                                0) == (0, False)
    got, _ = read_transfer(path)
    assert torch.equal(got["global_k"], t["global_k"])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_transfer(path)
