"""Profiling a model: run the calibration texts and needle tasks, return the scores."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from redknot_vllm.dims import ModelDims
from redknot_vllm.profiler.probe import AttentionProbe, load_model
from redknot_vllm.profiler.prose import load_texts, synthetic_texts
from redknot_vllm.profiler.recorder import (
    ScoreSums,
    prefix_handler,
    retrieval_handler,
    sampled_edge_handler,
)
from redknot_vllm.profiler.samples import Tokens, calibration_ids, needle_sample
from redknot_vllm.profiler.scores import Matrix, ProfileError, ProfileScores, to_matrix

logger = logging.getLogger(__name__)

DEFAULT_WINDOWS: tuple[int, ...] = (256, 512, 1024, 2048)
PREFIXES: tuple[str, ...] = (
    "The following document is provided for reference.\n\n",
    "Background context unrelated to the question below.\n\n",
)
"""Unrelated prefixes prepended to each calibration text (prefix_shift)."""
MIN_MAX_TOKENS = 64


def check_model_dir(model_dir: str | Path) -> Path:
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise ProfileError(f"model_dir (MODEL) {p} is not a folder with config.json; pass a "
                           "local Hugging Face model folder (or `smollm2` on the command line)")
    return p


def check_windows(windows: Sequence[int], sink: int) -> tuple[int, ...]:
    ws = tuple(sorted(set(windows)))
    if not ws or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in ws):
        raise ProfileError(f"windows (--windows) is {list(windows)!r}; expected positive "
                           "integers such as 256,512,1024,2048")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ProfileError(f"sink (--sink) is {sink!r}; expected an integer >= 0")
    return ws


def _positive(v: Any, name: str, flag: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ProfileError(f"{name} ({flag}) is {v!r}; expected an integer >= {minimum}")
    return v


def profile_heads(
    model_dir: str | Path,
    texts: Sequence[str] | str | Path | None = None,
    *,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    sink: int = 4,
    max_tokens: int = 2048,
    n_texts: int = 8,
    n_retrieval: int = 8,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
) -> ProfileScores:
    """Score every (layer, KV head) of the model at ``model_dir`` (see the module docstring).

    ``device``: where the fp32 HF model runs (default the CPU).

    ``texts``: calibration texts, a path (see :func:`load_texts`) or None for synthetic
    prose. Scores are rounded to 6 decimals so that re-classifying from the JSON gives the
    same heads as classifying from the returned object.
    """
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from redknot_vllm.fingerprint import model_fingerprint

    root = check_model_dir(model_dir)
    ws = check_windows(windows, sink)
    _positive(max_tokens, "max_tokens", "--max-tokens", MIN_MAX_TOKENS)
    _positive(n_texts, "n_texts", "--n-texts")
    _positive(n_retrieval, "n_retrieval", "--n-retrieval", 0)
    chunk_single = False
    if texts is None:
        source = f"synthetic(seed={seed})"
        texts = synthetic_texts(n_texts, seed, min_chars=8 * max_tokens)
    elif isinstance(texts, (str, Path)):
        source = str(texts)
        chunk_single = Path(texts).is_file() and Path(texts).suffix != ".jsonl"
        texts = load_texts(texts)
    else:
        source = f"<{len(texts)} texts>"
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ProfileError("texts is empty; pass non-empty strings, a path or None for "
                               "the built-in synthetic prose")

    cfg = AutoConfig.from_pretrained(str(root))
    dims = ModelDims.from_hf_config(cfg)
    layers, hq, hkv = dims.num_layers, dims.num_q_heads, dims.num_kv_heads
    tok = Tokens(AutoTokenizer.from_pretrained(str(root)))
    calib = calibration_ids(tok, texts, max_tokens, n_texts, chunk_single)
    prefixes = [tok(p) for p in PREFIXES]
    needles = [needle_sample(tok, random.Random(f"redknot-profile-needle/{seed}/{i}"),
                              max_tokens) for i in range(n_retrieval)]
    probe = AttentionProbe()
    dev = device or "cpu"
    model = load_model(root, probe=probe, device=dev)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    acc = ScoreSums(layers, hq, ws)
    s = len(tok.lead)

    bar = tqdm(total=len(calib) + len(needles), desc="profiling heads", unit="pass",
               disable=not progress)
    try:
        for x in calib:
            n = len(x)
            rows = [x] + [x[:s] + p + x[s:] for p in prefixes]
            blocks: list[torch.Tensor | slice] = [
                slice(len(p), len(p) + n) if s == 0 else
                torch.cat([torch.arange(s), torch.arange(s + len(p), len(p) + n)])
                for p in prefixes]
            # right padding: causal attention never lets a real token see a pad
            width = max(map(len, rows))
            batch = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=dev)
            probe.run(model, batch, prefix_handler(acc, n, blocks, ws, sink, probe.buffer))
            acc.n_shift += len(prefixes)
            for w in ws:
                acc.n_edge[w] += n > sink + w
            bar.update()
        _needle_passes(probe, model, needles, acc, dev, bar)
    finally:
        bar.close()
        probe.release()

    for w in ws:
        if not acc.n_edge[w]:
            logger.warning("edge_mass@%d: no calibration text is longer than sink + window "
                           "= %d tokens, so it scores 0 (a window that wide drops nothing on "
                           "these texts); profile with --max-tokens > %d to measure it",
                           w, sink + w, sink + w)
    params = {
        "windows": list(ws), "sink": sink, "max_tokens": max_tokens, "n_texts": len(calib),
        "n_retrieval": len(needles), "seed": seed, "calibration": source,
        "dtype": "float32", "prefixes": list(PREFIXES),
        "edge_mass_texts": {str(w): acc.n_edge[w] for w in ws},
        **({"device": str(dev)} if str(dev) != "cpu" else {}),
    }
    return ProfileScores(
        num_layers=layers, num_kv_heads=hkv,
        prefix_shift=_per_kv_head(acc.shift, acc.n_shift, hkv),
        edge_mass={w: _per_kv_head(acc.edge[w], acc.n_edge[w], hkv) for w in ws},
        retrieval=_per_kv_head(acc.retrieval, acc.n_retrieval, hkv),
        windows=ws, sink=sink, params=params,
        model_fingerprint=model_fingerprint(root), model=root.resolve().name,
    )


def _needle_passes(probe: AttentionProbe, model: Any, needles: Sequence[Any], acc: ScoreSums,
                   dev: str, bar: Any) -> None:
    """The retrieval passes: only the answer-predicting rows' maps are made."""
    for ns in needles:
        probe.run(model, torch.tensor([ns.ids], device=dev),
                  retrieval_handler(acc, torch.tensor(ns.needle)),
                  rows=torch.tensor(ns.queries))
        acc.n_retrieval += 1
        bar.update()


def _per_kv_head(t: torch.Tensor, n: int, num_kv_heads: int) -> Matrix:
    """Sums ``[layers, query heads]`` over ``n`` passes -> means per KV head: a KV head is
    as non-local as the most non-local query head that shares it."""
    return to_matrix((t / max(n, 1)).view(t.shape[0], num_kv_heads, -1).amax(-1))


def profile_long(model_dir: str | Path, scores: ProfileScores, *, long_tokens: int,
                 windows: Sequence[int] = (1024, 2048, 4096), n_texts: int = 2,
                 n_needles: int = 4, distractors: int = 3, rows: int = 128, seed: int = 0,
                 device: str | None = None, progress: bool = True) -> ProfileScores:
    """Add long-context scores to a profile: the attention a local head would drop at
    ``long_tokens`` of context, and retrieval among distractors.

    * ``edge_mass_long[W]``: for ``rows`` query positions spread over each of ``n_texts``
      calibration texts of ``long_tokens`` tokens, the mass on keys outside sink + W (only
      these rows' maps are made: ``rows x long_tokens`` per head, never ``T x T``);
    * ``retrieval_long``: needle tasks of ``long_tokens`` tokens with ``distractors`` other
      codes; the mass the answer-predicting rows put on the target's number tokens.

    Runs on ``device`` (default: CUDA when available); the HF model in fp32.
    """
    import dataclasses

    from tqdm import tqdm
    from transformers import AutoTokenizer

    root = check_model_dir(model_dir)
    ws = check_windows(windows, scores.sink)
    _positive(long_tokens, "long_tokens", "--long-tokens", max(ws) + scores.sink + 16)
    for v, name, flag in ((n_texts, "n_texts", "--long-texts"), (rows, "rows", "--long-rows")):
        _positive(v, name, flag)
    _positive(n_needles, "n_needles", "--long-needles", 0)
    _positive(distractors, "distractors", "--long-distractors", 0)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokens(AutoTokenizer.from_pretrained(str(root)))
    texts = synthetic_texts(n_texts, seed + 7919, min_chars=8 * long_tokens)
    calib = calibration_ids(tok, texts, long_tokens, n_texts, chunk_single=False)
    needles = [needle_sample(tok, random.Random(f"redknot-profile-long-needle/{seed}/{i}"),
                             long_tokens, distractors) for i in range(n_needles)]
    probe = AttentionProbe()
    model = load_model(root, probe=probe, device=dev)
    layers, hkv = scores.num_layers, scores.num_kv_heads
    hq = model.config.num_attention_heads
    sink = scores.sink
    acc = ScoreSums(layers, hq, ws)
    bar = tqdm(total=len(calib) + len(needles), desc="profiling heads (long)", unit="pass",
               disable=not progress)
    try:
        for x in calib:
            n = len(x)
            pos = torch.linspace(sink + min(ws), n - 1, rows).round().long().unique()
            probe.run(model, torch.tensor([x], device=dev),
                      sampled_edge_handler(acc, pos, ws, sink), rows=pos)
            for w in ws:
                acc.n_edge[w] += n > sink + w
            bar.update()
        _needle_passes(probe, model, needles, acc, dev, bar)
    finally:
        bar.close()
        probe.release()

    return dataclasses.replace(
        scores,
        edge_mass_long={w: _per_kv_head(acc.edge[w], acc.n_edge[w], hkv) for w in ws},
        retrieval_long=(_per_kv_head(acc.retrieval, acc.n_retrieval, hkv) if needles
                        else None),
        long_params={"long_tokens": long_tokens, "windows": list(ws), "n_texts": len(calib),
                     "rows": rows, "n_needles": len(needles), "distractors": distractors,
                     "seed": seed, "device": str(dev), "dtype": "float32"})
