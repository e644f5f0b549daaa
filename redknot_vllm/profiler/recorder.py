"""Score recorders: handlers that fold each layer's attention maps into running sums."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from redknot_vllm.profiler.probe import Handler

Scratch = Callable[[str, tuple[int, ...]], torch.Tensor]
"""``scratch(name, shape)``: a reusable buffer (:meth:`AttentionProbe.buffer`)."""


class ScoreSums:
    """Running sums per (layer, query head), float64."""

    def __init__(self, layers: int, heads: int, windows: Sequence[int]) -> None:
        z = lambda: torch.zeros(layers, heads, dtype=torch.float64)  # noqa: E731
        self.shift, self.n_shift = z(), 0
        self.edge = {w: z() for w in windows}
        self.n_edge = dict.fromkeys(windows, 0)
        self.retrieval, self.n_retrieval = z(), 0


def _block(probs: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
    """``probs[:, idx][:, :, idx]`` for ``[H, T, T]`` maps (a view when ``idx`` is a slice)."""
    if isinstance(idx, slice):
        return probs[:, idx, idx]
    idx = idx.to(probs.device)
    return probs.index_select(1, idx).index_select(2, idx)


def prefix_handler(acc: ScoreSums, n: int, blocks: list[torch.Tensor | slice],
                   windows: Sequence[int], sink: int, scratch: Scratch) -> Handler:
    """prefix_shift and edge_mass of one calibration text.

    Batch row 0 is ``x`` (``n`` tokens); row ``k`` is ``p_k + x``, ``x`` at ``blocks[k-1]``.
    """

    def handle(layer: int, probs: torch.Tensor) -> None:
        a0 = probs[0, :, :n, :n]
        n0 = torch.linalg.vector_norm(a0, dim=(-2, -1))
        tmp = scratch("tmp", tuple(a0.shape))
        for k, idx in enumerate(blocks, 1):
            a1 = _block(probs[k], idx)
            n1 = torch.linalg.vector_norm(a1, dim=(-2, -1))
            dot = torch.mul(a0, a1, out=tmp).sum((-2, -1))
            cos = dot / (n0 * n1).clamp_min(1e-30)
            acc.shift[layer] += (1 - cos.double()).clamp_(0, 1).cpu()
        csum = torch.cumsum(a0, -1, out=tmp)
        for w in windows:
            if n <= sink + w:
                continue
            rows = torch.arange(sink + w, n, device=probs.device)
            acc.edge[w][layer] += _edge_mass(csum, rows, rows, w, sink)

    return handle


def sampled_edge_handler(acc: ScoreSums, pos: torch.Tensor, windows: Sequence[int],
                         sink: int) -> Handler:
    """edge_mass of one long text from the maps of the sampled query positions ``pos``
    only (run with ``rows=pos``)."""

    def handle(layer: int, probs: torch.Tensor) -> None:
        csum = probs[0].cumsum(-1)  # [H, R, T]
        p = pos.to(csum.device)
        for w in windows:
            ok = p >= sink + w
            if not bool(ok.any()):
                continue
            r = torch.nonzero(ok).flatten()
            acc.edge[w][layer] += _edge_mass(csum, r, p[r], w, sink)

    return handle


def _edge_mass(csum: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, w: int,
               sink: int) -> torch.Tensor:
    """Per head, the mean over query ``rows`` of ``csum`` (``[H, R, T]`` row-wise prefix
    sums of the maps; ``pos``: those queries' positions) of the mass on keys
    ``sink <= j <= pos - W``: a prefix-sum difference per query."""
    out = csum[:, rows, pos - w]
    if sink:
        out = out - csum[:, rows, sink - 1]
    return out.double().clamp_(0, 1).mean(-1).cpu()


def retrieval_handler(acc: ScoreSums, needle: torch.Tensor) -> Handler:
    """retrieval of one needle task, from the maps of the answer-predicting rows only (run
    with ``rows=queries``); score = their mean mass on the needle."""

    def handle(layer: int, probs: torch.Tensor) -> None:
        mass = probs[0].index_select(2, needle.to(probs.device)).sum(-1).mean(-1)
        acc.retrieval[layer] += mass.double().clamp_(0, 1).cpu()

    return handle

