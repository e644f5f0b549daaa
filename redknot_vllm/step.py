"""One forward step's RedKnot state, owned by the per-engine runtime.

A step's state is created by the runtime when the attention builder plans a step with
prefill rows, and every field below names who writes it (W) and who reads it (R); nobody
else touches it. The order within one step::

    builder.build()            runtime.begin_step(md): a new StepState is current
    connector.start_load_kv()  reuse worker: splices stored KV, restricts the rows
                               (blend: after the forward's first layers)
    model forward              model: runs ``compute_index``; attention: importance;
                               sparse FFN: kept tokens
    model forward returns      runtime.end_forward(): no step is current
    connector.wait_for_save()  accounting: rows -> requests, FLOPs, reused tokens

Steps without prefill rows have no state (decode runs dense); the runtime keeps the
states of finished steps until accounting drains them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from redknot_vllm.attention.metadata import (
    RedKnotAttentionMetadata,
    first_slots,
    tokens_to_row_end,
)

if TYPE_CHECKING:
    from redknot_vllm.attention.plan import LayerPlan
    from redknot_vllm.reuse.blend import BlendPlan


class KVOverwrite(Protocol):
    """KV written over a layer's fresh KV before attention reads it (reuse, seed policy)."""

    def write_local_heads(self, plan: LayerPlan, kv_cache: torch.Tensor) -> None: ...


@dataclass
class StepState:
    """See the module docstring."""

    attn: RedKnotAttentionMetadata
    """The step's attention metadata. W: builder; reuse worker (rows restricted to the
    computed tokens). R: reuse worker, accounting, sparse FFN (token layout)."""
    want_importance: bool
    """The sparse FFN is on. W: runtime. R: attention."""
    token_importance_sq: dict[int, torch.Tensor] = field(default_factory=dict)
    """Layer index -> ``[num_actual_tokens]`` fp32 Σ over this rank's heads of o².
    W: attention. R: sparse FFN of the same layer."""
    ffn_kept: dict[int, torch.Tensor] = field(default_factory=dict)
    """Layer index -> ``[num_reqs]`` int64 prefill tokens whose FFN ran (sparse layers).
    W: sparse FFN. R: accounting (after the forward)."""
    compute_index: torch.Tensor | None = None
    """Token indices the model runs (on the device); None: every token. W: reuse worker.
    R: model forward."""
    reused: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """Request first slot -> position ranges spliced from stored KV, not computed.
    W: reuse worker. R: accounting."""
    row_first_slots: list[int] | None = None
    """Per row of ``attn``, the slot of its request's first token this step; None: the
    row's own first token. W: reuse worker (restricted rows). R: accounting."""
    kv_overwrite: KVOverwrite | None = None
    """W: reuse worker (seed policy). R: attention, after the layer's KV write."""
    blend: BlendPlan | None = None
    """``recompute_select="blend"``: the forward runs ``blend.layers`` layers on every token,
    then has the reuse worker restrict the step. W: reuse worker. R: model forward,
    accounting (the reused tokens ran those layers)."""
    _to_row_end: torch.Tensor | None = field(default=None, repr=False)

    def tokens_to_row_end(self) -> torch.Tensor:
        """``[num_actual_tokens]`` tokens after each in its row; derived once per step."""
        if self._to_row_end is None:
            self._to_row_end = tokens_to_row_end(self.attn)
        return self._to_row_end

    def rows_changed(self) -> None:
        """``attn`` now has other rows (blend restricts half-way through the forward): drop
        what was derived from the old ones; the FFN of the layers already run is then
        accounted as dense."""
        self.ffn_kept.clear()
        self._to_row_end = None

    def first_slots(self) -> list[int]:
        """Per row, the slot that identifies its request in this step (one transfer)."""
        if self.row_first_slots is not None:
            return self.row_first_slots
        return first_slots(self.attn)

    def record_ffn_kept(self, layer: int, keep: torch.Tensor) -> None:
        """Count a sparse layer's kept prefill tokens per row (on the device)."""
        md = self.attn
        assert md.token_row is not None and md.token_is_prefill is not None
        counts = torch.zeros(md.num_reqs, dtype=torch.long, device=keep.device)
        self.ffn_kept[layer] = counts.index_add_(0, md.token_row,
                                                 (keep & md.token_is_prefill).long())

    def ffn_kept_host(self) -> dict[int, list[int]]:
        """``ffn_kept`` on the host, copied in one transfer (after the forward)."""
        if not self.ffn_kept:
            return {}
        layers = list(self.ffn_kept)
        rows = torch.stack([self.ffn_kept[li] for li in layers]).cpu().tolist()
        return dict(zip(layers, rows, strict=True))
