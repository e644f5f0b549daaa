"""Stored KV on its way into a step's pages: relocated one layer at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from redknot_vllm.kernels.headclass_attention import FULL
from redknot_vllm.kernels.paged_kv import write_kv
from redknot_vllm.kv_store import Segment
from redknot_vllm.relocation import relocate_keys, relocation_rows

if TYPE_CHECKING:
    from redknot_vllm.attention.plan import LayerPlan


@dataclass
class SplicedKV:
    """The reused tokens of one step: where they go and where their stored KV is.

    K is relocated one layer at a time (:meth:`layer`), so a 64K-token splice never holds
    more than one layer's relocated keys; the token indices and the rotation rows are
    built once per step, on the first layer."""

    slots: torch.Tensor
    """[n] destination slots."""
    parts: list[tuple[Segment, torch.Tensor, int]]
    """(segment, token offsets in it (host), segment start position), in slot order."""
    rotary: Any
    layer_row: dict[int, int] = field(default_factory=dict)
    """layer index -> index into the segments' layer dimension."""
    _step: tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, init=False, repr=False)

    def _prepare(self) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        if self._step is None:
            dev = self.slots.device
            offs = [o.to(dev, non_blocking=True) for _, o, _ in self.parts]
            src = torch.cat(offs)
            dst = torch.cat([o + start for o, (_, _, start) in zip(offs, self.parts,
                                                                   strict=True)])
            self._step = offs, relocation_rows(self.rotary, src, dst)
        return self._step

    def layer(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Relocated K and V ``[n, H, D]`` of one layer, on the slots' device."""
        dev = self.slots.device
        offs, rows = self._prepare()
        # a host-tier segment crosses PCIe one whole layer at a time, then is gathered
        ks = [seg.k[row].to(dev, non_blocking=True)[o] for (seg, _, _), o in zip(
            self.parts, offs, strict=True)]
        vs = [seg.v[row].to(dev, non_blocking=True)[o] for (seg, _, _), o in zip(
            self.parts, offs, strict=True)]
        k = relocate_keys(torch.cat(ks), 0, 0, self.rotary, rows=rows)
        return k, torch.cat(vs)

    def write_all_heads(self, row: int, kv_cache: torch.Tensor) -> None:
        """Write one layer's relocated KV into its cache (selective policy)."""
        write_kv(kv_cache, self.slots, *self.layer(row))

    def write_local_heads(self, plan: LayerPlan, kv_cache: torch.Tensor) -> None:
        """Seed policy: called by the attention layer after its cache write, before
        attention; the local heads read the relocated stored KV, the others their own."""
        heads = [h for g in plan.groups if g.window != FULL and not g.topk for h in g.kv_heads]
        row = self.layer_row.get(plan.layer)
        if heads and row is not None:
            k, v = self.layer(row)
            write_kv(kv_cache, self.slots, k, v, torch.tensor(heads, device=kv_cache.device))
