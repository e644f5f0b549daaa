"""Shared fixtures. Engines start once per session (about 20-30 s each on CPU)."""

from __future__ import annotations

import gc
import os
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
    from redknot_vllm.embedded import smollm2_path

    return str(smollm2_path())


def _shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


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
    """The shipped demo configuration (80% local heads + sparse FFN), 4K prompts unchunked."""
    from redknot_vllm import engine_args
    from redknot_vllm.demo import DEMO_HEAD_CONFIG, DEMO_SPARSE_FFN, _shipped

    kw = {**COMMON, "max_num_batched_tokens": 8192}
    yield from _engine(**engine_args(smollm2, head_config=_shipped(DEMO_HEAD_CONFIG),
                                     sparse_ffn=_shipped(DEMO_SPARSE_FFN), **kw))


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
