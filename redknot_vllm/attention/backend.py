"""The RedKnot attention backend for vLLM: head-class prefill, full-attention decode.

Four parts, as in vLLM's own backends:

* :class:`RedKnotAttentionBackend` declares capabilities;
* :class:`RedKnotMetadataBuilder` turns ``CommonAttentionMetadata`` into
  :class:`RedKnotAttentionMetadata` once per step (all layers share it);
* :class:`RedKnotAttentionImpl` runs a layer: prefill rows attend per head class (local
  heads see sinks plus a window), decode rows attend to the whole KV cache, and the
  per-token output norm is left in the metadata for the sparse FFN.

Decode uses full attention over all KV on purpose: every head's KV is stored for every
token, so decode reads exactly what dense vLLM would, and the quality risk of RedKnot stays
confined to prefill. (Trimming local heads' decode KV is SegPagedAttention's job.)

A row counts as prefill while its request is still in its prompt
(``CommonAttentionMetadata.is_prefilling``, set by vLLM's V1 model runner), so a one-token
final chunk of a prompt is still prefill and chunked and unchunked prefill agree.

This module is the CPU implementation in plain torch (``redknot_vllm.kernels``); it keeps
its own plain KV layout, so KV can be read back and written (stock CPU_ATTN packs blocks
per ISA and cannot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from redknot_vllm import compat
from redknot_vllm.attention.plan import LayerPlan
from redknot_vllm.kernels.headclass_attention import paged_headclass_attention, write_kv_cache

logger = init_logger(__name__)


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
        return RedKnotAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[RedKnotMetadataBuilder]:
        return RedKnotMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class RedKnotAttentionMetadata:
    """Per-step metadata shared by every RedKnot layer of a KV-cache group."""

    num_actual_tokens: int  # Number of tokens excluding padding.
    num_reqs: int
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: list[int]  # num_reqs + 1 token offsets (host)
    seq_lens: list[int]  # num_reqs context lengths incl. this step (host)
    is_prefill: list[bool]  # num_reqs: request still in its prompt (host)
    has_prefill: bool
    token_row: torch.Tensor  # [num_actual_tokens] int64 row of each token
    token_is_prefill: torch.Tensor  # [num_actual_tokens] bool
    tokens_to_row_end: torch.Tensor  # [num_actual_tokens] int64, 0 = last token of its row
    want_importance: bool  # the sparse FFN reads token_importance_sq
    token_importance_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    """attention layer name -> [num_actual_tokens] fp32 Σ over this rank's heads of o²."""
    ffn_kept: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer index -> [num_reqs] int64 prefill tokens whose FFN ran (sparse layers only)."""

    def record_ffn_kept(self, layer: int, keep: torch.Tensor) -> None:
        counts = torch.zeros(self.num_reqs, dtype=torch.long, device=keep.device)
        self.ffn_kept[layer] = counts.index_add_(
            0, self.token_row, (keep & self.token_is_prefill).long())


class RedKnotMetadataBuilder(AttentionMetadataBuilder[RedKnotAttentionMetadata]):
    """Builds the step's metadata once; every layer reuses it."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from redknot_vllm.runtime import find_runtime

        self.runtime = find_runtime(vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RedKnotAttentionMetadata:
        cm = common_attn_metadata
        num_reqs, num_tokens = cm.num_reqs, cm.num_actual_tokens
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = compat.seq_lens_cpu(cm)[:num_reqs].tolist()
        q_lens = [qsl[i + 1] - qsl[i] for i in range(num_reqs)]
        prefilling = compat.is_prefilling(cm)
        if prefilling is None:
            logger.warning_once(
                "RedKnot: the model runner does not report is_prefilling (vLLM's v2 model "
                "runner); treating rows with more than one new token as prefill. Set "
                "VLLM_USE_V2_MODEL_RUNNER=0 for exact prefill detection.")
            is_prefill = [q > 1 for q in q_lens]
        else:
            is_prefill = prefilling[:num_reqs].tolist()
        rows = torch.arange(num_reqs).repeat_interleave(torch.tensor(q_lens, dtype=torch.long))
        ends = torch.tensor(qsl[1:], dtype=torch.long)
        md = RedKnotAttentionMetadata(
            num_actual_tokens=num_tokens,
            num_reqs=num_reqs,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            is_prefill=is_prefill,
            has_prefill=any(is_prefill),
            token_row=rows.to(self.device, non_blocking=True),
            token_is_prefill=torch.tensor(is_prefill, dtype=torch.bool)[rows].to(
                self.device, non_blocking=True),
            tokens_to_row_end=(ends[rows] - 1 - torch.arange(num_tokens)).to(
                self.device, non_blocking=True),
            want_importance=self.runtime is not None and self.runtime.sparse_ffn is not None,
        )
        if self.runtime is not None and md.has_prefill:
            self.runtime.begin_step(md)
        return md


class RedKnotAttentionImpl(AttentionImpl[RedKnotAttentionMetadata]):
    """Runs one layer. Plain torch: this is the CPU path and the reference for GPU kernels."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        redknot_plan: LayerPlan | None = None,
    ) -> None:
        unsupported = [name for name, v in (
            ("alibi_slopes", alibi_slopes), ("sliding_window", sliding_window),
            ("logits_soft_cap", logits_soft_cap),
            ("kv_sharing_target_layer_name", kv_sharing_target_layer_name)) if v]
        if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            unsupported.append(f"kv_cache_dtype={kv_cache_dtype}")
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attn_type={attn_type}")
        if unsupported:
            raise NotImplementedError(
                f"RedKnot attention does not support {', '.join(unsupported)}; serve this "
                "model without RedKnot")
        if redknot_plan is None:
            raise ValueError("RedKnotAttentionImpl needs a redknot_plan (built by the model "
                             "override)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.plan = redknot_plan

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        write_kv_cache(key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: RedKnotAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention for one layer.

        Args:
            query: ``[num_tokens, num_heads, head_size]``.
            key, value: ``[num_tokens, num_kv_heads, head_size]`` (already in the cache).
            kv_cache: logical ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
            output: ``[num_tokens, num_heads, head_size]``, written in place.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("RedKnot attention has no fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output.fill_(0)
        md = attn_metadata
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        o = output[:n].view(n, self.num_heads, self.head_size)
        paged_headclass_attention(q, kv_cache, md.block_table, md.query_start_loc, md.seq_lens,
                                  md.is_prefill, self.plan.groups, self.scale, o)
        if md.want_importance and md.has_prefill:
            md.token_importance_sq[layer.layer_name] = o.float().square().sum(dim=(1, 2))
        return output
