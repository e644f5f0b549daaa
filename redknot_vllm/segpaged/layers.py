"""SegPaged's two attention layers per decoder layer (``docs/segpaged-design.md`` 2, step 3).

A decoder layer's ``self_attn.attn`` becomes a :class:`SegPagedAttention`: its global KV
heads ``[0, kv_global)`` (full and retrieval heads, plus the widest locals when a layer has
fewer non-local heads than ``kv_global``) stay in a plain vLLM ``Attention`` under the old
layer name, with vLLM's full-attention KV-cache spec; its local heads go to a
:class:`RedKnotLocalAttention` named ``...self_attn.attn_local`` whose spec is a
:class:`~redknot_vllm.segpaged.spec.SinkSlidingWindowSpec`. vLLM's hybrid KV-cache manager
then puts every global layer in one KV-cache group and every local layer in another, whose
requests hold only their sink and window pages.

The heads are contiguous after :func:`redknot_vllm.attention.plan.permute_attention_heads`
(the split's plan orders every layer so), so the module only slices the projections'
outputs at the head boundary and concatenates the two outputs: ``o_proj`` and the decoder
forward are untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from vllm.model_executor.layers.attention import Attention

from redknot_vllm.segpaged.spec import SinkSlidingWindowSpec

LOCAL_SUFFIX = "_local"
"""A decoder layer's local-heads attention layer is named its attention layer's name + this."""


class RedKnotLocalAttention(Attention):
    """The local heads' layer: vLLM's ``Attention`` with a sink + sliding-window spec."""

    def __init__(self, *, redknot_window: int, redknot_sink: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.redknot_window = redknot_window
        self.redknot_sink = redknot_sink

    def get_kv_cache_spec(self, vllm_config: Any) -> SinkSlidingWindowSpec:
        """The stock full-attention spec of these heads (block size, dtype, head size as
        vLLM chose them), made a sliding window of ``redknot_window`` with sinks."""
        full = super().get_kv_cache_spec(vllm_config)
        names = {f.name for f in dataclasses.fields(SinkSlidingWindowSpec) if f.init}
        kw = {f.name: getattr(full, f.name) for f in dataclasses.fields(full)
              if f.init and f.name in names}
        kw.update(sliding_window=self.redknot_window, num_sink_tokens=self.redknot_sink)
        return SinkSlidingWindowSpec(**kw)


class SegPagedAttention(torch.nn.Module):
    """Stands in for a decoder layer's ``Attention``: global heads, then local heads."""

    def __init__(self, global_attn: Attention, local_attn: RedKnotLocalAttention,
                 kv_global: int, per_kv: int, head_size: int) -> None:
        super().__init__()
        self.attn = global_attn
        self.attn_local = local_attn
        self.q_split = kv_global * per_kv * head_size
        self.kv_split = kv_global * head_size

    @property
    def layer_name(self) -> str:
        return self.attn.layer_name

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        """``[T, Hq * D]`` queries, ``[T, Hkv * D]`` keys and values (heads in plan order)
        -> ``[T, Hq * D]``."""
        qs, ks = self.q_split, self.kv_split
        # contiguous halves: vLLM's attention op views its inputs as [T, heads, D]
        out_g = self.attn(query[..., :qs].contiguous(), key[..., :ks].contiguous(),
                          value[..., :ks].contiguous(), **kwargs)
        out_l = self.attn_local(query[..., qs:].contiguous(), key[..., ks:].contiguous(),
                                value[..., ks:].contiguous(), **kwargs)
        return torch.cat([out_g, out_l], dim=-1)
