"""Which KV heads of each layer go to the global and to the local KV-cache group.

SegPaged splits every decoder layer's attention into two vLLM attention layers, and vLLM's
hybrid KV-cache manager groups layers by *equal* KV-cache spec (``num_kv_heads``, window and
sinks are spec fields). Per-layer splits would give one KV-cache group per distinct split,
so the split is fixed model-wide (``docs/segpaged-design.md`` 2.3):

* ``kv_global`` = the most full + retrieval heads any layer has on this rank: the global
  layer of every decoder layer holds that many KV heads (all of the layer's full and
  retrieval heads, then its local heads with the largest windows, which stay masked by
  the kernel: correct, only not trimmed);
* the local layer holds the other ``num_kv_heads - kv_global`` heads, all local, and its
  pages follow one ``(window, sink)``: the largest window and sink among them (each head
  keeps its own mask in the kernels; the pages retained cover the widest).
"""

from __future__ import annotations

from dataclasses import dataclass

from redknot_vllm.attention.plan import HeadKey, LayerPlan, head_key, plan_layer
from redknot_vllm.errors import RedKnotError
from redknot_vllm.head_config import HeadConfig
from redknot_vllm.kernels.headclass_attention import HeadGroup


class SegPagedError(RedKnotError, ValueError):
    """A head config SegPaged cannot split (nothing local to trim)."""


@dataclass(frozen=True)
class SegSplit:
    """The model-wide split of one TP rank's KV heads."""

    kv_global: int
    """KV heads in every layer's global group, ``[0, kv_global)`` after the permutation."""
    kv_local: int
    """KV heads in every layer's local group, ``[kv_global, kv_global + kv_local)``."""
    window: int
    """The local group's sliding window (its pages: sinks + the last ``window - 1`` tokens)."""
    sink: int
    """The local group's sink tokens."""


def _order(k: HeadKey) -> HeadKey:
    """Full, then retrieval, then local heads by *descending* window and sink (so the
    locals that go into the global range are the widest)."""
    return (k[0], -k[1], -k[2], k[3], k[4])


def _layer_keys(head_config: HeadConfig, layer: int, heads: list[int]) -> list[HeadKey]:
    return [head_key(head_config, layer, h) for h in heads]


def split_kv_heads(head_config: HeadConfig, tp_rank: int = 0, tp_size: int = 1) -> SegSplit:
    """The split of this rank's KV heads; a config with no local head left to trim on
    some layer (every head there full or retrieval) is refused, naming the layer."""
    heads = head_config.rank_kv_heads(tp_rank, tp_size)
    layers = [_layer_keys(head_config, layer, heads) for layer in range(head_config.num_layers)]
    kg = 0
    for layer, keys in enumerate(layers):
        nonlocal_ = sum(k[0] < 2 for k in keys)
        if nonlocal_ == len(heads):
            raise SegPagedError(
                f"head config {head_config.source}: layer {layer} has no local KV head on TP "
                f"rank {tp_rank}, so SegPaged has nothing to trim (every layer's local group "
                "must hold the same number of heads); turn SegPaged off for this config")
        kg = max(kg, nonlocal_)
    # the local ranges hold only local heads (kg >= every layer's non-local count)
    local = [k for keys in layers for k in sorted(keys, key=_order)[kg:]]
    return SegSplit(kv_global=kg, kv_local=len(heads) - kg,
                    window=max(k[1] for k in local), sink=max(k[2] for k in local))


def split_layer_plan(head_config: HeadConfig, layer: int, split: SegSplit, tp_rank: int = 0,
                     tp_size: int = 1) -> tuple[LayerPlan, LayerPlan, LayerPlan]:
    """One layer under ``split``: the whole layer's plan (its permutation regroups the
    weights; as :func:`redknot_vllm.attention.plan.build_layer_plan` gives it, but with locals
    by descending window), then the plans of its global layer (KV heads
    ``[0, kv_global)``) and of its local layer (the rest, re-indexed from 0; both identity
    permutations). The whole plan's groups never straddle ``kv_global``: a run of equal heads
    crossing it is cut in two."""
    keys = _layer_keys(head_config, layer, head_config.rank_kv_heads(tp_rank, tp_size))
    plan = plan_layer(layer, keys, order=_order, cut=split.kv_global)
    kg = split.kv_global
    global_plan = LayerPlan(layer=layer, groups=tuple(g for g in plan.groups
                                                      if g.kv_heads[0] < kg),
                            kv_perm=tuple(range(kg)))
    local = tuple(HeadGroup(tuple(h - kg for h in g.kv_heads), g.window, g.sink,
                            topk=g.topk, block=g.block)
                  for g in plan.groups if g.kv_heads[0] >= kg)
    local_plan = LayerPlan(layer=layer, groups=local, kv_perm=tuple(range(split.kv_local)))
    return plan, global_plan, local_plan
