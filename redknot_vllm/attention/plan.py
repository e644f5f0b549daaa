"""Per-layer attention plans: decided once at model build, read by every forward step.

Heads are regrouped so that each head group is a contiguous range of KV heads (full
groups first, then local groups by window and sink). The model's Q/K/V and O projection
weights are permuted once after loading (:func:`permute_attention_heads`), so the
kernels slice head ranges instead of gathering heads every step. Consequence: the KV cache
of a RedKnot layer stores KV heads in ``kv_perm`` order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from redknot_vllm import compat
from redknot_vllm.head_config import HeadClass, HeadConfig
from redknot_vllm.kernels.headclass_attention import FULL, HeadGroup


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's KV heads (on this TP rank) attend during prefill."""

    layer: int
    """Decoder layer index."""
    groups: tuple[HeadGroup, ...]
    """Head groups over the *permuted* KV heads of this rank; each a contiguous range."""
    kv_perm: tuple[int, ...]
    """``kv_perm[i]`` = original (rank-local) KV head now stored at position ``i``."""

    @property
    def all_full(self) -> bool:
        return all(g.is_full for g in self.groups)

    @property
    def is_identity(self) -> bool:
        return self.kv_perm == tuple(range(len(self.kv_perm)))


HeadKey = tuple[int, int, int, int, int]
"""A head's attention rule: (class rank: 0 full, 1 block-sparse retrieval, 2 local; window;
sink; top_k; block). Heads with equal keys can share a head group."""


def head_key(head_config: HeadConfig, layer: int, head: int) -> HeadKey:
    """The rule of one KV head (retrieval heads without ``retrieval_blocks`` are full)."""
    cls = head_config.effective_class(layer, head)
    rb = head_config.retrieval_blocks
    if cls is HeadClass.LOCAL:
        return (2, head_config.windows[layer][head], head_config.sinks[layer][head], 0, 0)
    if cls is HeadClass.RETRIEVAL and rb is not None:
        return (1, rb.window, 0, rb.top_k, rb.block)
    return (0, FULL, 0, 0, 0)


def plan_layer(layer: int, keys: list[HeadKey], order: Callable[[HeadKey], Any] = lambda k: k,
               cut: int | None = None) -> LayerPlan:
    """The plan of a layer whose (rank-local) heads have ``keys``: heads sorted by
    ``order(key)`` (stable), each run of equal keys one group, a run crossing position
    ``cut`` split there."""
    perm = sorted(range(len(keys)), key=lambda i: order(keys[i]))
    groups: list[HeadGroup] = []
    start = 0
    for i in range(1, len(perm) + 1):
        if i == len(perm) or keys[perm[i]] != keys[perm[start]] or i == cut:
            _, w, s, k, b = keys[perm[start]]
            groups.append(HeadGroup(tuple(range(start, i)), w, s, topk=k, block=b))
            start = i
    return LayerPlan(layer=layer, groups=tuple(groups), kv_perm=tuple(perm))


def build_layer_plan(head_config: HeadConfig, layer: int, tp_rank: int, tp_size: int) -> LayerPlan:
    """Group this rank's KV heads of ``layer``: full heads, then block-sparse retrieval
    heads (when the config has ``retrieval_blocks``; otherwise they are full), then local
    heads by (window, sink)."""
    return plan_layer(layer, [head_key(head_config, layer, h)
                              for h in head_config.rank_kv_heads(tp_rank, tp_size)])


def permute_attention_heads(self_attn: torch.nn.Module, plan: LayerPlan) -> None:
    """Reorder one attention module's heads in place to ``plan.kv_perm`` (after loading).

    Q heads move with their KV head (GQA groups are contiguous), and the O projection's
    input columns move with the Q heads, so the layer computes the same function.
    """
    if plan.is_identity:
        return
    qkv, o = self_attn.qkv_proj, self_attn.o_proj
    for lin in (qkv, o):
        if not compat.is_unquantized(lin):
            raise NotImplementedError(
                f"RedKnot regroups attention heads by permuting weights, which needs "
                f"unquantized projections; {lin.prefix if hasattr(lin, 'prefix') else 'a layer'}"
                f" uses {type(lin.quant_method).__name__}. Use a head config whose groups are "
                "already contiguous, or an unquantized model")
    num_kv, d = len(plan.kv_perm), self_attn.head_dim
    per = self_attn.num_heads // num_kv
    kv = torch.tensor(plan.kv_perm, device=qkv.weight.device)
    q_idx = (kv[:, None] * per + torch.arange(per, device=kv.device)).reshape(-1)
    q_size, kv_size = self_attn.q_size, self_attn.kv_size

    def rows(t: torch.Tensor) -> torch.Tensor:
        q, k, v = t.split([q_size, kv_size, kv_size], dim=0)
        q = q.reshape(-1, d, *q.shape[1:])[q_idx].reshape(q.shape)
        k = k.reshape(-1, d, *k.shape[1:])[kv].reshape(k.shape)
        v = v.reshape(-1, d, *v.shape[1:])[kv].reshape(v.shape)
        return torch.cat([q, k, v], dim=0)

    with torch.no_grad():
        qkv.weight.copy_(rows(qkv.weight))
        if getattr(qkv, "bias", None) is not None:
            qkv.bias.copy_(rows(qkv.bias))
        w = o.weight
        o.weight.copy_(w.reshape(w.shape[0], -1, d)[:, q_idx].reshape(w.shape))
