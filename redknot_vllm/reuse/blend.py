"""``recompute_select="blend"``: the recomputed tokens chosen from this request's own KV.

CacheBlend's rule (Yao et al., EuroSys 2025) inside vLLM's single forward: every stored
token's KV is spliced, the first ``reuse.blend_layers`` decoder layers run on *every*
token of the step (their KV is then exact), and the KV those layers wrote at the last of
them is compared with what was spliced there. In each segment, the first
``recompute_first`` tokens and the ``chunk``-token chunks that deviated most run the
remaining layers, up to the segment's share; the others keep the spliced KV from there on.
Which tokens deviate depends on what precedes them in *this* prompt, so the choice is the
request's own, not a property of the stored document.

The worker (:meth:`redknot_vllm.reuse.worker.ReuseWorker.splice`) builds a
:class:`BlendPlan`; the model's forward (:mod:`redknot_vllm.models.apply`) runs the first
layers, asks the worker to restrict the step (:func:`blend_chunks` picks), then runs the
rest over the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from redknot_vllm.reuse.splice import SplicedKV


@dataclass
class BlendGroup:
    """One segment's candidate tokens in this step."""

    start: int
    """Index of its first candidate in the plan's candidate order."""
    chunk_ids: torch.Tensor
    """Host long ``[count]``: each candidate's (spliced token's) chunk within the segment."""
    quota: int
    """Chunks of this segment to recompute in this step."""

    @property
    def count(self) -> int:
        """Candidates of this segment in this step."""
        return len(self.chunk_ids)


@dataclass
class BlendPlan:
    """What the forward needs to choose, half-way, the tokens it keeps computing."""

    layers: int
    """Decoder layers run on every token before the choice."""
    token_index: torch.Tensor
    """Host long ``[n]``: the candidates' token indices in the step."""
    slots: torch.Tensor
    """``[n]`` their KV slots (device), in the same order."""
    groups: list[BlendGroup]
    spliced: SplicedKV
    """The step's spliced KV (candidates in its order)."""


def kv_deviation(fresh_k: torch.Tensor, fresh_v: torch.Tensor, stored_k: torch.Tensor,
                 stored_v: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., n]``: per token, the relative L2 distance of fresh from stored K and V
    (``[..., n, H, D]`` each), averaged over K, V and heads (the probe averages it over
    layers too)."""
    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = b.float()
        return (a.float() - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)

    return ((rel(fresh_k, stored_k) + rel(fresh_v, stored_v)) / 2).mean(dim=-1)


def blend_chunks(deviation: torch.Tensor, groups: list[BlendGroup]) -> torch.Tensor:
    """Host bool ``[n]``: the candidates to recompute, every token of each group's
    ``quota`` chunks of highest mean ``deviation`` (ties: the earlier chunk)."""
    dev = deviation.float().cpu()
    out = torch.zeros(dev.numel(), dtype=torch.bool)
    for g in groups:
        if g.quota <= 0 or g.count == 0:
            continue
        ids = g.chunk_ids
        uniq, inv = torch.unique(ids, return_inverse=True)
        total = torch.zeros(len(uniq)).index_add_(0, inv, dev[g.start:g.start + g.count])
        mean = total / torch.bincount(inv, minlength=len(uniq)).float()
        order = torch.argsort(-mean, stable=True)[:g.quota]  # ties: the earlier chunk
        pick = torch.zeros(len(uniq), dtype=torch.bool)
        pick[order] = True
        out[g.start:g.start + g.count] = pick[inv]
    return out
