"""The RedKnot attention implementation: runs one layer on CPU (torch) or CUDA (FA3 + Triton)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionImpl, AttentionLayer, AttentionType

from redknot_vllm import compat, envs
from redknot_vllm.attention.metadata import RedKnotAttentionMetadata
from redknot_vllm.attention.plan import LayerPlan
from redknot_vllm.kernels.headclass_attention import paged_headclass_attention
from redknot_vllm.kernels.headclass_attention_cuda import (
    local_attention_cuda,
    paged_headclass_attention_cuda,
)
from redknot_vllm.kernels.paged_kv import write_kv

if TYPE_CHECKING:
    from redknot_vllm.runtime import RedKnotRuntime

logger = init_logger(__name__)


class RedKnotAttentionImpl(AttentionImpl[RedKnotAttentionMetadata]):
    """Runs one layer: head classes for prefill rows, full attention for decode rows."""

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
        redknot_runtime: RedKnotRuntime | None = None,
        redknot_local: bool = False,
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
        if redknot_plan is None or redknot_runtime is None:
            raise ValueError("RedKnotAttentionImpl needs redknot_plan and redknot_runtime "
                             "(given by the model override, redknot_vllm.models.apply)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.plan = redknot_plan
        self.runtime = redknot_runtime
        self.local = redknot_local
        """SegPaged's local layer: its decode rows attend by head class (sinks + window)."""
        self._fa_impl = None
        self._torch_on_cuda = envs.attention_impl() == "torch"
        if self._torch_on_cuda:
            logger.warning_once("VLLM_REDKNOT_ATTENTION=torch: RedKnot prefill attention runs "
                                "the torch implementation (a diagnostic; slow on a GPU)")
        from vllm.platforms import current_platform

        if current_platform.is_cuda() and not redknot_local:
            self._fa_impl = compat.flash_attn_impl(num_heads, head_size, scale,
                                                   self.num_kv_heads, kv_cache_dtype, attn_type)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if key.is_cuda:
            from vllm._custom_ops import reshape_and_cache_flash

            key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
            k_scale, v_scale = compat.kv_scales(layer)
            reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                    self.kv_cache_dtype, k_scale, v_scale)
        else:
            write_kv(kv_cache, slot_mapping, key, value)

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

        NOTE: this runs eagerly between piecewise CUDA graphs, so even views and slices
        cost host time on every layer of every step; benchmark every change here.

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
        if md.fa is not None:  # CUDA, no prefill rows: exactly dense vLLM's attention
            assert self._fa_impl is not None
            return self._fa_impl.forward(layer, query, key, value, kv_cache, md.fa, output)
        step = self.runtime.step
        if step is not None and step.kv_overwrite is not None:
            try:
                step.kv_overwrite.write_local_heads(self.plan, kv_cache)
            except Exception as e:  # the fresh KV stays: the step runs as without reuse
                step.kv_overwrite = None
                logger.error("RedKnot reuse (seed policy): overwriting local heads failed in "
                             "layer %d (%s: %s); the step keeps its computed KV", self.plan.layer,
                             type(e).__name__, e)
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        o = output[:n].view(n, self.num_heads, self.head_size)
        if q.is_cuda and not self._torch_on_cuda:
            if self.local:  # SegPaged: prefill and decode rows alike by head class
                local_attention_cuda(q, kv_cache, md, self.plan.groups, self.scale, o)
            else:
                paged_headclass_attention_cuda(q, kv_cache, md, self.plan.groups, self.scale,
                                               o)
        else:
            paged_headclass_attention(q, kv_cache, md.block_table, md.query_start_loc_cpu,
                                      md.seq_lens_cpu, md.is_prefill_cpu, self.plan.groups,
                                      self.scale, o, md.full_tail_cpu,
                                      decode_groups=self.plan.groups if self.local else None)
        if step is not None and step.want_importance and md.has_prefill:
            # one fused fp32 reduction; no fp32 copy of the output is materialised
            sq = torch.linalg.vector_norm(o.reshape(n, -1), dim=-1,
                                          dtype=torch.float32).square()
            if self.local:  # SegPaged: the decoder layer's global half ran first; the
                # squared norm of the whole output is the sum of the halves'
                step.token_importance_sq[self.plan.layer] += sq
            else:
                step.token_importance_sq[self.plan.layer] = sq
        return output
