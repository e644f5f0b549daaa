"""redknot-vllm: head-aware long-context prefill for vLLM (RedKnot).

Public API::

    from vllm import LLM
    from redknot_vllm import engine_args, request_stats

    llm = LLM(**engine_args(model_dir, head_config="head.json", sparse_ffn="ffn.json"))
    outs = llm.generate(prompts)
    stats = request_stats(llm, [o.request_id for o in outs])
"""

from __future__ import annotations

from typing import Any

from redknot_vllm.config import RedKnotConfig, SparseFFNConfig, engine_args
from redknot_vllm.head_config import HeadClass, HeadConfig

__version__ = "0.1.0"

__all__ = ["HeadClass", "HeadConfig", "RedKnotConfig", "SparseFFNConfig", "engine_args",
           "request_stats"]


def request_stats(llm: Any, request_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per-request prefill FLOPs and kept FFN fraction; see
    :func:`redknot_vllm.worker_extension.request_stats`."""
    from redknot_vllm.worker_extension import request_stats as _impl

    return _impl(llm, request_ids)
