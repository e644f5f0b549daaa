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


def question_focus(prompt: Sequence[int], uses: Sequence[tuple[int, int]], chunk: int,
                   limit: int = 4096) -> list[tuple[int, ...]]:
    """Per use ``(start, length)``: its chunks ranked by what they share with the question,
    most first (chunks sharing nothing are left out).

    The question is the prompt after the last use (at most :data:`QUESTION_TOKENS`; the
    last 64 tokens when the prompt ends inside a segment). A chunk scores the token pairs
    (bigrams) it shares with the question, each weighted by one over its number of
    occurrences in the context, so a pair every document has ("born in") counts little
    and a name the question asks about counts much; the chunk after a match gets half its
    score (the answer follows what names it). Lexical and on the host: no model pass.
    """
    p = np.asarray(prompt, dtype=np.int64)
    if len(p) < 3 or not uses:
        return [() for _ in uses]
    end = max(a + n for a, n in uses)
    q0 = end if end < len(p) - 1 else len(p) - 64
    q0 = max(q0, len(p) - QUESTION_TOKENS, 1)
    codes = (p[:-1] << 21) | p[1:]  # token pairs (ids < 2**21)
    question = np.unique(codes[q0:])
    context = codes[:q0 - 1] if q0 > 1 else codes[:0]
    hit = np.isin(context, question)
    if not hit.any():
        return [() for _ in uses]
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
        score = score[:nch]
        order = [int(c) for c in np.argsort(-score, kind="stable") if score[c] > 0]
        out.append(tuple(order[:limit]))
    return out
