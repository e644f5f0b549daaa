"""The RPC surface RedKnot adds to vLLM's workers (``worker_extension_cls``).

``collective_rpc`` calls these by method name (callables would need pickle-based RPC);
:func:`request_stats` is the user-facing wrapper.
"""

from __future__ import annotations

import os
from typing import Any

from redknot_vllm.runtime import find_runtime


class RedKnotWorkerExtension:
    """Mixed into vLLM's worker; ``self.vllm_config`` and ``self.model_runner`` are the
    worker's."""

    vllm_config: Any
    model_runner: Any

    def redknot_worker_info(self) -> dict[str, Any]:
        """Where and how RedKnot runs in this worker (process id, model class, layers)."""
        rt = find_runtime(self.vllm_config)
        ctx = self.vllm_config.compilation_config.static_forward_context
        return {
            "pid": os.getpid(),
            "model_class": type(self.model_runner.model).__name__,
            "redknot_attention_layers": 0 if rt is None else len(rt.plans),
            "sparse_ffn_layers": sum(hasattr(m, "redknot_threshold") for m in ctx.values()),
            "runtime": rt is not None,
        }

    def redknot_prefill_totals(self) -> dict[str, Any]:
        """Aggregate prefill accounting since the last call, when running without the
        connector (benchmarks): tokens, FLOPs dense/RedKnot, kept FFN fraction."""
        rt = find_runtime(self.vllm_config)
        return {} if rt is None else rt.take_totals().as_dict()

    def redknot_reuse_tiers(self, gpu_bytes: int, host_bytes: int) -> dict[str, Any]:
        """Benchmarks: reopen the reuse store with other memory-tier limits (every segment
        stays on disk); returns the old store's stats."""
        rt = find_runtime(self.vllm_config)
        if rt is None or rt.reuse is None:
            return {}
        return rt.reuse.reopen_store(gpu_bytes, host_bytes)

    def redknot_reuse_stats(self) -> dict[str, Any]:
        """The reuse store's tiers, hits, misses and corrupt files (``{}`` without reuse)."""
        rt = find_runtime(self.vllm_config)
        return {} if rt is None or rt.reuse is None else rt.reuse.store.stats()

    def redknot_request_stats(self, request_ids: list[str] | None) -> dict[str, dict[str, Any]]:
        """Kept per-request stats (see :func:`request_stats`)."""
        rt = find_runtime(self.vllm_config)
        if rt is None or rt.requests is None:
            return {}
        return rt.requests.lookup(request_ids)


def request_stats(llm: Any, request_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per-request RedKnot prefill stats from the engine's workers (rank 0's view).

    Args:
        llm: a ``vllm.LLM`` built with :func:`redknot_vllm.engine_args`.
        request_ids: ``RequestOutput.request_id`` values; None returns all kept results.

    Returns:
        request id -> {prompt_tokens, cached_tokens, prefill_tokens, reused_tokens,
        flops_dense, flops_redknot, flops_saved, ffn_kept_fraction, ...}. Requests still in
        prefill, or run without the RedKnot connector, are absent.
    """
    per_worker = llm.collective_rpc("redknot_request_stats", args=(request_ids,))
    return per_worker[0] if per_worker else {}
