"""The RedKnot attention backend for vLLM: head-class prefill, full-attention decode.

Four parts, as in vLLM's own backends:

* :class:`RedKnotAttentionBackend` (here) declares capabilities;
* :class:`~redknot_vllm.attention.builder.RedKnotMetadataBuilder` turns
  ``CommonAttentionMetadata`` into
  :class:`~redknot_vllm.attention.metadata.RedKnotAttentionMetadata` once per step (all
  layers share it) and opens the step's state in the runtime;
* :class:`~redknot_vllm.attention.impl.RedKnotAttentionImpl` runs a layer: prefill rows
  attend per head class (local heads see sinks plus a window), decode rows attend to the
  whole KV cache, and the per-token output norm goes to the step state for the sparse FFN.

Decode uses full attention over all KV on purpose: every head's KV is stored for every
token, so decode reads exactly what dense vLLM would, and the quality risk of RedKnot stays
confined to prefill. (Trimming local heads' decode KV is SegPagedAttention's job.)

On CPU the layers run plain torch (``kernels/headclass_attention.py``) over a plain K|V
layout, so KV can be read back and written (stock CPU_ATTN packs blocks per ISA and cannot).
On CUDA they run FA3 per head group plus a Triton sink merge
(``kernels/headclass_attention_cuda.py``) over the same layout FLASH_ATTN uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf

from redknot_vllm import compat

if TYPE_CHECKING:
    from redknot_vllm.attention.builder import RedKnotMetadataBuilder
    from redknot_vllm.attention.impl import RedKnotAttentionImpl


class RedKnotAttentionBackend(compat.KVCacheShapeMixin, AttentionBackend):
    """Declares what the RedKnot backend supports; chosen per layer by the model override."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                      torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        # Must name an existing AttentionBackendEnum member; the plugin registers CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[RedKnotAttentionImpl]:
        from redknot_vllm.attention.impl import RedKnotAttentionImpl

        return RedKnotAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[RedKnotMetadataBuilder]:
        from redknot_vllm.attention.builder import RedKnotMetadataBuilder

        return RedKnotMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER
