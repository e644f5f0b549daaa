"""Classifying heads from their scores, and ``profile()``: profile, classify, write."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from redknot_vllm.head_config import HeadConfig
from redknot_vllm.profiler.run import (
    DEFAULT_WINDOWS,
    check_model_dir,
    check_windows,
    profile_heads,
    profile_long,
)
from redknot_vllm.profiler.scores import (
    SCORE_NAMES,
    Matrix,
    ProfileError,
    ProfileScores,
    to_matrix,
)

logger = logging.getLogger(__name__)

METHOD = ("redknot-profiler-v1: max(prefix_shift, edge_mass@W, retrieval), "
          "each max-normalised")


def _check_fraction(global_fraction: Any) -> float:
    if (isinstance(global_fraction, bool) or not isinstance(global_fraction, (int, float))
            or not 0.0 <= global_fraction <= 1.0):
        raise ProfileError(f"global_fraction (--global-fraction) is {global_fraction!r}; "
                           "expected a number in [0, 1] (e.g. 0.2 for 20% global heads)")
    return float(global_fraction)


def _check_window(window: Any, windows: Sequence[int]) -> int:
    if window not in windows or isinstance(window, bool):
        raise ProfileError(f"window (--window) is {window!r}, which was not profiled; pick "
                           f"one of the profiled windows {sorted(windows)} or profile again "
                           f"with --windows including it")
    return int(window)


def combined_scores(scores: ProfileScores, window: int,
                    weights: dict[str, float] | None = None) -> Matrix:
    """``[L][H]`` max of the (weighted) max-normalised scores, edge_mass at ``window``."""
    _check_window(window, scores.windows)
    w = dict.fromkeys(SCORE_NAMES, 1.0)
    unknown = sorted(set(weights or {}) - set(SCORE_NAMES))
    if unknown:
        raise ProfileError(f"weights has unknown key(s) {unknown}; expected {list(SCORE_NAMES)}")
    w.update(weights or {})
    mats = scores.score_matrices(window)
    norm = {}
    for name, m in mats.items():
        top = max(max(row) for row in m)
        norm[name] = [[x / top if top > 0 else 0.0 for x in row] for row in m]
    return [[max(w[k] * norm[k][li][h] for k in mats)
             for h in range(scores.num_kv_heads)] for li in range(scores.num_layers)]


def ranked_heads(scores: ProfileScores, window: int,
                 weights: dict[str, float] | None = None) -> list[tuple[int, int, float]]:
    """(layer, head, combined) from most to least global; ties by (layer, head)."""
    return _rank(combined_scores(scores, window, weights))


def _rank(comb: Matrix) -> list[tuple[int, int, float]]:
    order = sorted(((li, h) for li in range(len(comb)) for h in range(len(comb[li]))),
                   key=lambda lh: (-comb[lh[0]][lh[1]], lh[0], lh[1]))
    return [(li, h, comb[li][h]) for li, h in order]


def classify(scores: ProfileScores, global_fraction: float, window: int,
             sink: int | None = None, weights: dict[str, float] | None = None,
             tail_full_tokens: int = 0, dense_prefix_layers: int = 0,
             retrieval_fraction: float = 0.0,
             retrieval_blocks: dict[str, int] | None = None,
             wide_fraction: float = 0.0, wide_window: int | None = None,
             globals_per_layer: int = 0) -> HeadConfig:
    """Top ``round(L * H * global_fraction)`` heads global, the rest local(``window``, ``sink``).

    With ``globals_per_layer`` instead (``global_fraction`` 0), each layer's top heads
    by the same score are global, so every layer keeps the same number of local heads:
    what SegPaged needs (its split is model-wide, and a layer without local heads has
    nothing to page).

    With ``retrieval_fraction``, the next ``round(L * H * retrieval_fraction)`` heads of the
    ranking are block-sparse retrieval heads (``retrieval_blocks``: top_k, block, window)
    instead of local; with ``wide_fraction``, the next ``round(L * H * wide_fraction)`` are
    local with the wider window ``wide_window`` (per-head windows: two tiers). ``sink``
    defaults to the profiled sink (4 by default), the one edge_mass assumed;
    ``tail_full_tokens`` and ``dense_prefix_layers`` pass into the config as they are.
    """
    f = _check_fraction(global_fraction)
    window = _check_window(window, scores.windows)
    sink = scores.sink if sink is None else sink
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ProfileError(f"sink (--sink) is {sink!r}; expected an integer >= 0")
    if sink != scores.sink:
        logger.warning("classifying with sink %d but edge_mass was profiled with sink %d",
                       sink, scores.sink)
    comb = combined_scores(scores, window, weights)
    ranked = _rank(comb)
    n_global = round(f * len(ranked))
    g = globals_per_layer
    if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g <= scores.num_kv_heads:
        raise ProfileError(f"globals_per_layer is {g!r}; expected an integer in "
                           f"[0, {scores.num_kv_heads}]")
    if g and f:
        raise ProfileError("give global_fraction or globals_per_layer, not both")
    if g:  # each layer's top g lead the ranking; the rest keep their model-wide order
        top = {(li, h) for li in range(scores.num_layers)
               for _, h, _ in _rank([comb[li]])[:g]}
        ranked = ([x for x in ranked if (x[0], x[1]) in top]
                  + [x for x in ranked if (x[0], x[1]) not in top])
        n_global, f = len(top), len(top) / len(ranked)
    rf = _check_fraction(retrieval_fraction)
    if rf and retrieval_blocks is None:
        raise ProfileError("retrieval_fraction needs retrieval_blocks (top_k, block, window)")
    if f + rf > 1:
        raise ProfileError(f"global_fraction {f} + retrieval_fraction {rf} exceed 1")
    n_retr = round(rf * len(ranked))
    wf = _check_fraction(wide_fraction)
    if wf and (wide_window is None or wide_window <= window):
        raise ProfileError(f"wide_window (--wide-window) is {wide_window!r}; a wide tier "
                           f"needs a window larger than window={window}")
    if f + rf + wf > 1:
        raise ProfileError(f"global_fraction {f} + retrieval_fraction {rf} + wide_fraction "
                           f"{wf} exceed 1")
    n_wide = round(wf * len(ranked))
    global_set = {(li, h) for li, h, _ in ranked[:n_global]}
    retr_set = {(li, h) for li, h, _ in ranked[n_global:n_global + n_retr]}
    wide_set = {(li, h) for li, h, _ in
                ranked[n_global + n_retr:n_global + n_retr + n_wide]}
    classes = [["global" if (li, h) in global_set else "retrieval" if (li, h) in retr_set
                else "local" for h in range(scores.num_kv_heads)]
               for li in range(scores.num_layers)]
    provenance = {
        "model": scores.model,
        "model_fingerprint": scores.model_fingerprint,
        "method": METHOD,
        "parameters": {
            "global_fraction": f, "window": window, "sink": sink, "weights": weights,
            **({"globals_per_layer": g} if g else {}),
            "tail_full_tokens": tail_full_tokens, "dense_prefix_layers": dense_prefix_layers,
            **({"retrieval_fraction": rf, "retrieval_blocks": retrieval_blocks} if n_retr
               else {}),
            **({"wide_fraction": wf, "wide_window": wide_window} if n_wide else {}),
            **{k: v for k, v in scores.params.items() if k != "sink"},
            "profiled_sink": scores.sink,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "redknot_vllm": _version(),
    }
    meta = {
        "sink": scores.sink,
        "scores": {
            "prefix_shift": scores.prefix_shift,
            "edge_mass": {str(w): m for w, m in sorted(scores.edge_mass.items())},
            "retrieval": scores.retrieval,
            **({"edge_mass_long": {str(w): m for w, m in sorted(scores.edge_mass_long.items())},
                "retrieval_long": scores.retrieval_long}
               if scores.edge_mass_long or scores.retrieval_long is not None else {}),
            "combined": to_matrix(torch.tensor(comb, dtype=torch.float64)),
        },
        **({"long_params": scores.long_params} if scores.long_params else {}),
    }
    return HeadConfig.from_dict({
        "num_layers": scores.num_layers,
        "num_kv_heads": scores.num_kv_heads,
        "dense_prefix_layers": dense_prefix_layers,
        "tail_full_tokens": tail_full_tokens,
        "kv_head_classification": classes,
        "kv_head_max_distance": [[(wide_window if (li, h) in wide_set else window)
                                  if c == "local" else -1 for h, c in enumerate(row)]
                                 for li, row in enumerate(classes)],
        "kv_head_sink_size": [[sink] * scores.num_kv_heads for _ in range(scores.num_layers)],
        **({"retrieval_blocks": retrieval_blocks} if n_retr else {}),
        "provenance": provenance,
        "profiling_meta": meta,
    }, source="<profile>")


def _version() -> str:
    from redknot_vllm import __version__

    return __version__


def profile(model_dir: str | Path, out: str | Path, *, global_fraction: float = 0.2,
            window: int = 1024, sink: int = 4, weights: dict[str, float] | None = None,
            tail_full_tokens: int = 0, long: dict[str, Any] | None = None,
            **kw: Any) -> HeadConfig:
    """Profile, classify and write the head config JSON to ``out``; returns it.

    ``kw`` goes to :func:`profile_heads` (texts, windows, max_tokens, n_texts, ...);
    ``long`` (``long_tokens``, ``windows``, ...) to :func:`profile_long` after it.
    """
    # fail before minutes of profiling, not after
    _check_fraction(global_fraction)
    check_model_dir(model_dir)
    _check_window(window, check_windows(kw.get("windows", DEFAULT_WINDOWS), sink))
    if weights:
        unknown = sorted(set(weights) - set(SCORE_NAMES))
        if unknown:
            raise ProfileError(f"weights has unknown key(s) {unknown}; expected "
                               f"{list(SCORE_NAMES)}")
    scores = profile_heads(model_dir, sink=sink, **kw)
    if long:
        scores = profile_long(model_dir, scores, **long)
    hc = classify(scores, global_fraction, window, sink=sink, weights=weights,
                  tail_full_tokens=tail_full_tokens)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hc.save_json(out)
    return hc

