"""Shared fixtures. Engines start once per session (about 20-30 s each on CPU)."""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

# Deterministic engines; the RedKnot CPU path is exact in fp32, so greedy comparisons are
# token-for-token.
COMMON: dict[str, Any] = dict(
    enforce_eager=True, dtype="float32", max_model_len=8192, seed=0,
    kv_cache_memory_bytes=768 << 20, max_num_batched_tokens=512,
)

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
          "back again. ")


def long_prompt(reps: int, key: str = "71432") -> str:
    return (FILLER * reps + f" The pass key is {key}. Remember it. {key} is the pass key. "
            + FILLER * reps + "\nWhat is the pass key? The pass key is")


@pytest.fixture(scope="session")
def smollm2() -> str:
    from redknot_vllm.registry import smollm2_path

    return str(smollm2_path())


def _shutdown(llm: Any) -> None:
    """Stop an engine's core (and its worker processes); a second call does nothing."""
    if getattr(llm, "_redknot_test_released", False):
        return
    llm._redknot_test_released = True
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


# Session-scoped engines, each released right after the last collected test that uses it
# (pytest would keep every one until the session ends: 2.5-3.5 GB each on CPU, and the
# suite then ran out of the 24 GB a CI machine has).
ENGINE_FIXTURES = ("stock_llm", "rk_global_llm", "rk_local_llm", "rk_demo_llm", "reuse_llm",
                   "hardened_llm", "seed_policy_llm")
_last_user: dict[str, str] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    _last_user.clear()
    for item in session.items:  # after deselection: the tests that will run, in order
        for name in getattr(item, "fixturenames", ()):
            if name in ENGINE_FIXTURES:
                _last_user[name] = item.nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    for name, nodeid in _last_user.items():
        llm = getattr(item, "funcargs", {}).get(name) if nodeid == item.nodeid else None
        if llm is not None:
            _shutdown(llm)


def _engine(**kwargs: Any) -> Iterator[Any]:
    from vllm import LLM

    llm = LLM(**kwargs)
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="session")
def stock_llm(smollm2: str) -> Iterator[Any]:
    """Stock vLLM, no plugin involvement (the stock architecture)."""
    yield from _engine(model=smollm2, **COMMON)


@pytest.fixture(scope="session")
def rk_global_llm(smollm2: str) -> Iterator[Any]:
    """RedKnot with every head global and the FFN dense."""
    from redknot_vllm import HeadConfig, engine_args

    hc = HeadConfig.shape(30, 3, 1.0, window=64)
    yield from _engine(**engine_args(smollm2, head_config=hc, **COMMON))


@pytest.fixture(scope="session")
def local_head_config():
    from redknot_vllm import HeadConfig

    return HeadConfig.shape(30, 3, 0.2, window=64, sink=4, seed=0)


@pytest.fixture(scope="session")
def rk_local_llm(smollm2: str, local_head_config) -> Iterator[Any]:
    """80% local heads with a small window, dense FFN: exact, so it must be invariant to
    chunking, batching and prefix-cache hits."""
    from redknot_vllm import engine_args

    yield from _engine(**engine_args(smollm2, head_config=local_head_config, **COMMON))


@pytest.fixture(scope="session")
def rk_demo_llm(smollm2: str) -> Iterator[Any]:
    """The shipped speed-demonstration configuration (80% local heads + sparse FFN), 4K
    prompts unchunked."""
    from redknot_vllm import engine_args
    from redknot_vllm.defaults import shipped_dir
    from redknot_vllm.demo import SHAPE_HEAD_CONFIG, SHAPE_SPARSE_FFN

    kw = {**COMMON, "max_num_batched_tokens": 8192}
    yield from _engine(**engine_args(smollm2, head_config=shipped_dir() / SHAPE_HEAD_CONFIG,
                                     sparse_ffn=shipped_dir() / SHAPE_SPARSE_FFN, **kw))


PREFACE = "Some unrelated preface text about the weather in spring and the price of bread. "
QUESTION = "\nQuestion: what is the secret code of the {name} vault? Answer: The code is"


def reuse_logprobs(llm: Any, prompt: list[int], reuse: str, salt: str | None = None,
                   **params: Any) -> tuple[list[float], list[int], dict[str, Any]]:
    """First-token top-5 logprobs, 4 greedy tokens and RedKnot stats of ``prompt`` with
    ``{"reuse": reuse, **params}``; salted by ``salt`` (default ``reuse``), since a stored
    document's own blocks are in the prefix cache."""
    from vllm import SamplingParams

    from redknot_vllm import request_stats

    sp = SamplingParams(max_tokens=4, temperature=0.0, logprobs=5, extra_args={
        "kv_transfer_params": {"redknot": {"reuse": reuse, **params}}})
    out = llm.generate([{"prompt_token_ids": prompt, "cache_salt": salt or reuse}], sp,
                       use_tqdm=False)[0]
    first = out.outputs[0].logprobs[0]
    stats = request_stats(llm, [out.request_id])[out.request_id]
    return [first[t].logprob for t in sorted(first)], list(out.outputs[0].token_ids), stats


def _doc(name: str, code: str, reps: int) -> str:
    return (f"Document about the {name} vault. The secret code of the {name} vault is {code}. "
            + FILLER * reps + f" End of the {name} document.")


# Offline KV reuse (tests/test_reuse.py, tests/test_hardening.py): one engine with every head
# global, so RedKnot attention is exactly dense and any difference comes from reuse itself.
@pytest.fixture(scope="session")
def reuse_llm(smollm2: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from redknot_vllm import HeadConfig, engine_args

    store = tmp_path_factory.mktemp("segments")
    hc = HeadConfig.shape(30, 3, 1.0, window=64)
    yield from _engine(**engine_args(smollm2, head_config=hc,
                                     reuse={"store_dir": str(store), "chunk": 16,
                                            "store_marked": True, "client_store": True},
                                     **COMMON))


@pytest.fixture(scope="session")
def stored(reuse_llm: Any) -> dict[str, Any]:
    """Two documents precomputed (stored alone, probed for deviation)."""
    from redknot_vllm.reuse import precompute

    tok = reuse_llm.get_tokenizer()
    docs = {"blue": _doc("blue", "48213", 14), "red": _doc("red", "90357", 12)}
    ids = {k: tok(v, add_special_tokens=False)["input_ids"] for k, v in docs.items()}
    digests = precompute(reuse_llm, list(ids.values()), progress=False)
    return {"tok": tok, "ids": ids, "digests": dict(zip(ids, digests, strict=True)),
            "llm": reuse_llm}



def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the segment-checksum secret of this test session (engine processes inherit it)
os.environ.setdefault("VLLM_REDKNOT_SEGMENT_KEY", os.path.join(
    tempfile.mkdtemp(prefix="redknot-test-key-"), "segment-key"))
