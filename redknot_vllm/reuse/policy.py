"""Which tokens of a reused segment are recomputed (``selective`` policy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from vllm.logger import init_logger

from redknot_vllm.config import ReuseConfig
from redknot_vllm.kv_store import Segment

logger = init_logger(__name__)


def recompute_mask(segment: Segment, cfg: ReuseConfig,
                   fraction: float | None = None, focus: Sequence[int] = ()) -> torch.Tensor:
    """Host bool ``[L]``: the segment's tokens to recompute under the selective policy
    (``fraction`` overrides ``cfg.recompute_fraction``).

    The first ``recompute_first`` tokens, then whole ``chunk``-token chunks: first those of
    ``focus`` in its order (the request's question, :func:`question_focus`), then by their
    mean stored ``deviation`` (how far the segment's KV moved behind unrelated context when
    it was probed), most deviating first, until the share of the whole segment is reached.
    """
    n = len(segment.key.token_ids)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:cfg.recompute_first] = True
    frac = cfg.recompute_fraction if fraction is None else fraction
    # the fraction is of the whole segment, its first tokens included, so that it means the
    # same share for a 1K-token document as for an 8K one
    extra = max(0, round((frac * n - min(cfg.recompute_first, n)) / cfg.chunk))
    for c in focus:
        if extra <= 0:
            break
        if 0 <= c < math.ceil(n / cfg.chunk) and not mask[c * cfg.chunk]:
            mask[c * cfg.chunk:(c + 1) * cfg.chunk] = True
            extra -= 1
    if extra and segment.deviation is not None:
        dev = segment.deviation.float().cpu()
        pad = (-n) % cfg.chunk
        score = torch.nn.functional.pad(dev, (0, pad)).view(-1, cfg.chunk).mean(1)
        score[mask[::cfg.chunk]] = -1  # chunks already recomputed (first tokens, focus)
        for c in score.topk(min(extra, score.numel())).indices.tolist():
            mask[c * cfg.chunk:(c + 1) * cfg.chunk] = True
    elif extra:
        logger.warning_once("RedKnot reuse: a stored segment has no deviation scores (stored "
                            "without `redknot precompute`'s probe); only its first %d tokens "
                            "are recomputed", cfg.recompute_first)
    return mask


QUESTION_TOKENS = 256
"""The question is at most this many of the prompt's last tokens."""


def question_scores(prompt: Sequence[int], uses: Sequence[tuple[int, int]],
                    chunk: int) -> list[np.ndarray]:
    """Per use ``(start, length)``: each of its ``chunk``-token chunks' score for what it
    shares with the question (float64 ``[ceil(length / chunk)]``, 0 for nothing).

    The question is the prompt after the last use (at most :data:`QUESTION_TOKENS`; the
    last 64 tokens when the prompt ends inside a segment). A chunk scores the token pairs
    (bigrams) it shares with the question, each weighted by one over its number of
    occurrences in the context, so a pair every document has ("born in") counts little
    and a name the question asks about counts much; the chunk after a match gets half its
    score (the answer follows what names it). Lexical and on the host: no model pass.
    """
    zeros = [np.zeros(-(-n // chunk)) for _, n in uses]
    p = np.asarray(prompt, dtype=np.int64)
    if len(p) < 3 or not uses:
        return zeros
    end = max(a + n for a, n in uses)
    q0 = end if end < len(p) - 1 else len(p) - 64
    q0 = max(q0, len(p) - QUESTION_TOKENS, 1)
    codes = (p[:-1] << 21) | p[1:]  # token pairs (ids < 2**21)
    question = np.unique(codes[q0:])
    context = codes[:q0 - 1] if q0 > 1 else codes[:0]
    hit = np.isin(context, question)
    if not hit.any():
        return zeros
    pairs, counts = np.unique(context[hit], return_counts=True)
    weight = np.zeros(len(context))
    weight[hit] = 1.0 / counts[np.searchsorted(pairs, context[hit])]
    out = []
    for a, n in uses:
        w = weight[a:min(a + n - 1, len(weight))]
        nch = -(-n // chunk)
        score = np.zeros(nch + 1)
        np.add.at(score, np.arange(len(w)) // chunk, w)
        score[1:] += 0.5 * score[:-1].copy()
        out.append(score[:nch])
    return out


def _ranked(score: np.ndarray, limit: int | None = None) -> tuple[int, ...]:
    """Chunks with a positive score, highest first (ties by position)."""
    order = [int(c) for c in np.argsort(-score, kind="stable") if score[c] > 0]
    return tuple(order[:limit])


def question_focus(prompt: Sequence[int], uses: Sequence[tuple[int, int]], chunk: int,
                   limit: int = 4096) -> list[tuple[int, ...]]:
    """Per use ``(start, length)``: its chunks ranked by what they share with the question
    (:func:`question_scores`), most first; chunks sharing nothing are left out."""
    return [_ranked(s, limit) for s in question_scores(prompt, uses, chunk)]


def pooled_plan(prompt: Sequence[int], uses: Sequence[tuple[int, int]], cfg: ReuseConfig,
                fraction: float) -> list[tuple[float, tuple[int, ...]]]:
    """``recompute_select="pooled"``: the request's recompute budget spent where its
    question points, across segments; per use ``(fraction, focus)`` for
    :func:`recompute_mask`.

    The budget is ``fraction`` of all the reused tokens together (the same FLOPs as the
    per-segment rules). Every segment's first ``recompute_first`` tokens come first; then
    segments in the order of their question score (the sum of their chunks'), each one
    *whole* while the budget holds it, else its best chunks until the budget ends (the
    record or file the question asks about is recomputed in its context, not 15% of it);
    what is left goes to every segment's most deviating chunks, each segment getting the
    part of it that its chunks not yet chosen are of all such chunks.
    """
    if not uses:
        return []
    chunk, first = cfg.chunk, cfg.recompute_first
    lengths = [n for _, n in uses]
    nch = [-(-n // chunk) for n in lengths]
    firsts = [min(first, n) for n in lengths]
    first_chunks = [-(-f // chunk) for f in firsts]  # chunks the first tokens already cover
    budget = int((fraction * sum(lengths) - sum(firsts)) // chunk)
    scores = question_scores(prompt, uses, chunk)
    focus: list[list[int]] = [[] for _ in uses]
    for i in sorted(range(len(uses)), key=lambda i: (-float(scores[i].sum()), i)):
        if budget <= 0 or scores[i].sum() <= 0:
            break
        s = scores[i].copy()
        s[:first_chunks[i]] = -1  # already recomputed
        rest = nch[i] - first_chunks[i]
        if rest <= budget:  # the whole segment: best chunks first, then in order
            picked = list(_ranked(s)) + [c for c in range(first_chunks[i], nch[i])
                                         if s[c] == 0]
        else:
            picked = list(_ranked(s, budget))
        focus[i] = picked
        budget -= len(picked)
    # the rest of the budget: each segment's share of it, for its deviation's picks
    free = [nch[i] - first_chunks[i] - len(focus[i]) for i in range(len(uses))]
    total_free = sum(free)
    extra = [0] * len(uses)
    if budget > 0 and total_free:
        share = [budget * f / total_free for f in free]
        extra = [min(free[i], int(share[i])) for i in range(len(uses))]
        # whole chunks left over by the rounding go to the largest remainders
        left = min(budget, total_free) - sum(extra)
        for i in sorted(range(len(uses)), key=lambda i: -(share[i] - int(share[i]))):
            if left <= 0:
                break
            if extra[i] < free[i]:
                extra[i] += 1
                left -= 1
    out = []
    for i, n in enumerate(lengths):
        k = len(focus[i]) + extra[i]
        # recompute_mask takes round((f * n - first) / chunk) chunks: exactly k
        out.append(((firsts[i] + k * chunk) / n, tuple(focus[i])))
    return out


def anchored_plan(prompt: Sequence[int], uses: Sequence[tuple[int, int]], chunk: int
                  ) -> tuple[int | None, list[tuple[int, ...]]]:
    """``recompute_select="anchored"``: (the use the question points to, or None; per use
    its question focus, as :func:`question_focus`).

    The anchor is the use sharing the most with the question (the sum of its chunks'
    :func:`question_scores`; ties go to the earlier one). It and every use that starts
    after it are computed in full, the uses before it reused under the ``question`` rule.
    Why: on Qwen2.5-Coder-0.5B (multi-document QA, CPU diagnostic in ``docs/reuse.md``)
    reusing only the records *before* the asked one kept 11 of 12 answers and reusing only
    those *after* it kept 2: a stale later record, prefilled without what precedes it,
    draws the answer to itself, while the earlier ones are read through the computed ones.
    No match with the question: no anchor, every use under the ``question`` rule. The
    FLOPs saved then depend on where the asked document is.
    """
    scores = question_scores(prompt, uses, chunk)
    focus = [_ranked(s) for s in scores]
    totals = [float(s.sum()) for s in scores]
    if not uses or max(totals) <= 0:
        return None, focus
    return max(range(len(uses)), key=lambda i: (totals[i], -uses[i][0])), focus
