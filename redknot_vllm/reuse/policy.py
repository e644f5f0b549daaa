"""Which tokens of a reused segment are recomputed (``selective`` policy)."""

from __future__ import annotations

import math

import torch
from vllm.logger import init_logger

from redknot_vllm.config import ReuseConfig
from redknot_vllm.kv_store import Segment

logger = init_logger(__name__)


def recompute_mask(segment: Segment, cfg: ReuseConfig,
                   fraction: float | None = None) -> torch.Tensor:
    """Host bool ``[L]``: the segment's tokens to recompute under the selective policy
    (``fraction`` overrides ``cfg.recompute_fraction``).

    The first ``recompute_first`` tokens, then whole ``chunk``-token chunks by their mean
    stored ``deviation`` (how far the segment's KV moved behind unrelated context when it
    was probed), most deviating first, until the share of the whole segment is reached.
    """
    n = len(segment.key.token_ids)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:cfg.recompute_first] = True
    frac = cfg.recompute_fraction if fraction is None else fraction
    # the fraction is of the whole segment, its first tokens included, so that it means the
    # same share for a 1K-token document as for an 8K one
    extra = max(0, round((frac * n - min(cfg.recompute_first, n)) / cfg.chunk))
    if extra and segment.deviation is not None:
        dev = segment.deviation.float().cpu()
        pad = (-n) % cfg.chunk
        score = torch.nn.functional.pad(dev, (0, pad)).view(-1, cfg.chunk).mean(1)
        score[: math.ceil(cfg.recompute_first / cfg.chunk)] = -1  # already recomputed
        for c in score.topk(min(extra, score.numel())).indices.tolist():
            mask[c * cfg.chunk:(c + 1) * cfg.chunk] = True
    elif extra:
        logger.warning_once("RedKnot reuse: a stored segment has no deviation scores (stored "
                            "without `redknot precompute`'s probe); only its first %d tokens "
                            "are recomputed", cfg.recompute_first)
    return mask
