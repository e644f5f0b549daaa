"""Per-layer attention plans: decided once at model build, read by every forward step."""

from __future__ import annotations

from dataclasses import dataclass

from redknot_vllm.head_config import HeadClass, HeadConfig
from redknot_vllm.kernels.headclass_attention import FULL, HeadGroup


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's KV heads (on this TP rank) attend during prefill."""

    layer: int
    """Decoder layer index."""
    groups: tuple[HeadGroup, ...]
    """Head groups over this rank's KV heads; full groups first."""

    @property
    def all_full(self) -> bool:
        return all(g.window == FULL for g in self.groups)


def build_layer_plan(head_config: HeadConfig, layer: int, tp_rank: int, tp_size: int) -> LayerPlan:
    """Group this rank's KV heads of ``layer`` by (window, sink); non-local heads are full.

    Retrieval heads run as full attention (top-p selection is not implemented yet).
    """
    rank_heads = head_config.rank_kv_heads(tp_rank, tp_size)
    buckets: dict[tuple[int, int], list[int]] = {}
    for local_idx, h in enumerate(rank_heads):
        cls = head_config.effective_class(layer, h)
        if cls is HeadClass.LOCAL:
            key = (head_config.windows[layer][h], head_config.sinks[layer][h])
        else:
            key = (FULL, 0)
        buckets.setdefault(key, []).append(local_idx)
    groups = tuple(HeadGroup(tuple(heads), w, s)
                   for (w, s), heads in sorted(buckets.items(), key=lambda kv: kv[0][0] != FULL))
    return LayerPlan(layer=layer, groups=groups)
