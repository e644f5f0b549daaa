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

SPLICE_BUDGET_BYTES = 512 << 20
"""Temporaries one splice may hold at a time (several layers' relocated KV)."""


@dataclass
class SplicedKV:
    """The reused tokens of one step: where they go and where their stored KV is.

    K is relocated a few layers at a time (:meth:`write_all_heads`, within
    :data:`SPLICE_BUDGET_BYTES`; one layer at a time under the seed policy); the token
    indices, the rotation rows and the slots' check are built once per step."""

    slots: torch.Tensor
    """[n] destination slots."""
    parts: list[tuple[Segment, torch.Tensor, int]]
    """(segment, token offsets in it (host), segment start position), in slot order."""
    rotary: Any
    layer_row: dict[int, int] = field(default_factory=dict)
    """layer index -> index into the segments' layer dimension."""
    local_slots: torch.Tensor | None = None
    """SegPaged: [n] the same tokens' slots in the local heads' KV-cache group."""
    kv_global: int = 0
    """SegPaged: a segment's heads ``[0, kv_global)`` go to the global layers' caches, the
    rest to the local layers'."""
    _step: tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, init=False, repr=False)

    def _prepare(self) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        if self._step is None:
            # the step's one check of its destination slots (a host sync), so the per-layer
            # writes need none; a negative slot means the plan is wrong: the step computes
            ok = (self.slots >= 0).all()
            if self.local_slots is not None:  # one sync for both groups
                ok = ok & (self.local_slots >= 0).all()
            if not bool(ok):
                raise ValueError("a reused token has no KV slot (negative slot mapping)")
            dev = self.slots.device
            offs = [o.to(dev, non_blocking=True) for _, o, _ in self.parts]
            src = torch.cat(offs)
            dst = torch.cat([o + start for o, (_, _, start) in zip(offs, self.parts,
                                                                   strict=True)])
            self._step = offs, relocation_rows(self.rotary, src, dst)
        return self._step

    def layers(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Relocated K and V ``[layers, n, H, D]`` of the segments' layers ``rows``, on the
        slots' device (a host-tier segment crosses PCIe those layers at a time)."""
        dev = self.slots.device
        offs, rot = self._prepare()
        ks = [seg.k[rows].to(dev, non_blocking=True)[:, o] for (seg, _, _), o in zip(
            self.parts, offs, strict=True)]
        vs = [seg.v[rows].to(dev, non_blocking=True)[:, o] for (seg, _, _), o in zip(
            self.parts, offs, strict=True)]
        k = relocate_keys(torch.cat(ks, dim=1), 0, 0, self.rotary, rows=rot)
        return k, torch.cat(vs, dim=1)

    def layer(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Relocated K and V ``[n, H, D]`` of one layer, on the slots' device."""
        k, v = self.layers(slice(row, row + 1))
        return k[0], v[0]

    def write_all_heads(self, kv_caches: list[torch.Tensor],
                        local_caches: list[torch.Tensor] | None = None,
                        budget_bytes: int = SPLICE_BUDGET_BYTES) -> None:
        """Write every layer's relocated KV into its cache (selective policy), as many
        layers at a time as ``budget_bytes`` of temporaries allow: on a small model the
        launches of a layer-by-layer splice, not its bytes, are the cost; on a large one
        a layer's relocated keys alone are hundreds of MB. SegPaged (``local_caches``, one
        per layer): the global heads into ``kv_caches``, the local heads into those, each
        at its own group's slots."""
        if not kv_caches:
            return
        split = local_caches is not None and self.local_slots is not None
        seg = self.parts[0][0]
        heads, d = seg.k.shape[-2:]
        # bf16 K and V gathered, fp32 rotation temporaries and the packed K|V write
        per_layer = max(1, len(self.slots) * heads * d * 16)
        step = max(1, min(len(kv_caches), budget_bytes // per_layer))
        for a in range(0, len(kv_caches), step):
            k, v = self.layers(slice(a, a + step))
            for j, cache in enumerate(kv_caches[a:a + step]):
                if not split:
                    write_kv(cache, self.slots, k[j], v[j], slots_checked=True)
                    continue
                g = self.kv_global
                write_kv(cache, self.slots, k[j][:, :g], v[j][:, :g], slots_checked=True)
                write_kv(local_caches[a + j], self.local_slots,  # type: ignore[index,arg-type]
                         k[j][:, g:], v[j][:, g:], slots_checked=True)

    def write_local_heads(self, plan: LayerPlan, kv_cache: torch.Tensor) -> None:
        """Seed policy: called by the attention layer after its cache write, before
        attention; the local heads read the relocated stored KV, the others their own."""
        heads = [h for g in plan.groups if g.window != FULL and not g.topk for h in g.kv_heads]
        row = self.layer_row.get(plan.layer)
        if heads and row is not None:
            k, v = self.layer(row)
            write_kv(kv_cache, self.slots, k, v, torch.tensor(heads, device=kv_cache.device),
                     slots_checked=True)
