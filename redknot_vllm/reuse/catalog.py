"""Which stored segments a prompt contains: found by content, or by the ranges it marks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from vllm.logger import init_logger

from redknot_vllm.kv_store import (
    INDEX_LIMIT,
    SegmentKey,
    quarantine,
    read_key,
    read_regular,
    segment_file,
)
from redknot_vllm.reuse.keys import ReuseSetup
from redknot_vllm.reuse.params import RequestParams, Use
from redknot_vllm.reuse.policy import anchored_plan, pooled_plan, question_focus

logger = init_logger(__name__)

ANCHOR = 16
"""Segments are looked up by their first ``ANCHOR`` tokens."""
# odd 64-bit multipliers of the anchor hash (fixed: hashes are recomputed, never stored)
_MULT = (np.random.default_rng(0x5EED).integers(1, 1 << 62, ANCHOR, dtype=np.uint64) * 2
         + 1).astype(np.uint64)


def anchor_hashes(tokens: np.ndarray) -> np.ndarray:
    """uint64 hash of every ``ANCHOR``-token window of ``tokens`` (``[n - ANCHOR + 1]``),
    vectorised; equal windows hash equal (a match is then checked token by token)."""
    win = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.uint64), ANCHOR)
    with np.errstate(over="ignore"):
        return (win * _MULT).sum(axis=1, dtype=np.uint64)


class Catalog:
    """Stored segments by their first :data:`ANCHOR` tokens, for matching prompts."""

    def __init__(self) -> None:
        self._by_anchor: dict[tuple[int, ...], dict[str, tuple[int, ...]]] = {}
        self._by_tokens: dict[tuple[int, ...], str] = {}
        self._ids: dict[str, tuple[int, ...]] = {}
        self._hashes: np.ndarray | None = None  # sorted anchor hashes; None: rebuild

    def __len__(self) -> int:
        return len(self._by_tokens)

    def add(self, key: SegmentKey, digest: str) -> None:
        self._by_anchor.setdefault(key.token_ids[:ANCHOR], {})[digest] = key.token_ids
        self._by_tokens[key.token_ids] = digest
        self._ids[digest] = key.token_ids
        self._hashes = None

    def digests(self) -> set[str]:
        return set(self._ids)

    def discard(self, digest: str) -> None:
        ids = self._ids.pop(digest, None)
        if ids is not None:
            self._by_tokens.pop(ids, None)
            self._by_anchor.get(ids[:ANCHOR], {}).pop(digest, None)
            self._hashes = None

    def exact(self, tokens: Sequence[int]) -> str | None:
        """The digest of a segment with exactly these tokens."""
        return self._by_tokens.get(tuple(tokens))

    def length_of(self, digest: str) -> int | None:
        """The number of tokens of a stored segment, or None."""
        ids = self._ids.get(digest)
        return None if ids is None else len(ids)

    def find(self, tokens: Sequence[int], start: int) -> list[Use]:
        """Leftmost-longest non-overlapping stored segments in ``tokens[start:]``.

        The positions where a stored segment may start are found by hashing every window
        at once (no per-position Python); only those are compared token by token.
        """
        uses: list[Use] = []
        n = len(tokens)
        if n - start < ANCHOR or not self._by_anchor:
            return uses
        if self._hashes is None:
            anchors = [a for a, c in self._by_anchor.items() if c and len(a) == ANCHOR]
            self._hashes = np.unique(anchor_hashes(np.asarray(anchors, dtype=np.int64)
                                                   .reshape(-1))[::ANCHOR]) if anchors \
                else np.zeros(0, dtype=np.uint64)
        h = anchor_hashes(np.asarray(tokens[start:], dtype=np.int64))
        cands_at = (np.nonzero(np.isin(h, self._hashes))[0] + start).tolist()
        i = start
        for at in cands_at:
            if at < i:
                continue  # inside a segment already matched
            cands = self._by_anchor.get(tuple(tokens[at:at + ANCHOR]))
            best = None
            for digest, ids in (cands or {}).items():
                if (len(ids) <= n - at and (best is None or len(ids) > best.length)
                        and tuple(tokens[at:at + len(ids)]) == ids):
                    best = Use(digest, at, len(ids))
            if best is not None:
                uses.append(best)
                i = at + best.length
        return uses


class SegmentCatalog:
    """Scheduler side: which segments exist for this engine's key space, read from the
    store's disk tier (the worker writes every segment through to it, and may run in another
    process), re-read when the store's index changes.

    Only headers are read here, and only from regular files inside the store (a FIFO never
    blocks the scheduler); a file whose header cannot be read is logged, renamed
    ``*.corrupt`` and counted in :attr:`corrupt`. Tensors are verified by the worker's store
    when a segment is used."""

    def __init__(self, setup: ReuseSetup) -> None:
        self.setup = setup
        self.cfg = setup.cfg
        self.dir = setup.store_dir
        self.catalog = Catalog()
        self.corrupt = 0
        """Files found unreadable or corrupt by this catalog."""
        self._mtime: float | None = None
        self.refresh()
        logger.info("RedKnot KV reuse: %d stored segment(s) for this model and head config in "
                    "%s (policy %s)", len(self.catalog), self.dir, self.cfg.policy)

    def refresh(self) -> None:
        """Re-read the index if it changed since the last call."""
        index = self.dir / "index.json"
        try:
            mtime = index.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            digests = set(json.loads(read_regular(index, self.dir, INDEX_LIMIT))["segments"])
        except (OSError, ValueError, KeyError, TypeError):
            # mid-replace, damaged or not a regular file: the worker's store repairs it
            # (and quarantines a non-file) at its start; retried when the index changes
            return
        known = self.catalog.digests()
        for d in known - digests:
            self.catalog.discard(d)
        for d in digests - known:
            if not isinstance(d, str) or len(d) != 64:
                continue
            path = segment_file(self.dir, d)
            try:
                key = read_key(path, self.dir)
            except FileNotFoundError:
                continue  # evicted since the index was written
            except Exception as e:  # not a regular file of the store, truncated, not ours
                self.corrupt += 1
                quarantine(path, e)
                continue
            if self.setup.matches(key):
                self.catalog.add(key, d)

    def length_of(self, digest: str) -> int | None:
        """The number of tokens of a stored segment of this engine, or None."""
        self.refresh()
        return self.catalog.length_of(digest)

    def plan(self, prompt: Sequence[int], start: int, params: RequestParams
             ) -> tuple[list[Use], list[tuple[int, int]], list[str]]:
        """(segments this request reuses at positions ``>= start``, its prefix-cache hit;
        marked ranges to store because they are not stored yet; notes for the log line)."""
        if params.store or params.probe is not None or params.reuse == "off":
            return [], [], []
        self.refresh()
        if isinstance(params.reuse, list):
            uses, misses, notes = self._marked(prompt, start, params)
            return self._focus(prompt, uses, params), misses, notes
        if not self.cfg.auto or not len(self.catalog):
            return [], [], []
        return self._focus(prompt, [replace(u, fraction=params.recompute_fraction)
                                    for u in self.catalog.find(prompt, start)
                                    if u.length >= self.cfg.min_tokens], params), [], []

    def _focus(self, prompt: Sequence[int], uses: list[Use], params: RequestParams
               ) -> list[Use]:
        """``recompute_select="question"``: each use's chunks ranked by the question;
        ``"pooled"``: the request's budget spread over its uses by the question (each use
        gets its own share and chunks); ``"anchored"``: the uses from the one the question
        points to on are dropped (computed), the others ranked as ``"question"``;
        ``"blend"``: chosen in the forward, marked."""
        select = params.recompute_select or self.cfg.recompute_select
        spans = [(u.start, u.length) for u in uses]
        if select == "question" and uses:
            ranked = question_focus(prompt, spans, self.cfg.chunk)
            return [replace(u, focus=f) for u, f in zip(uses, ranked, strict=True)]
        if select == "anchored" and uses:
            anchor, ranked = anchored_plan(prompt, spans, self.cfg.chunk)
            at = None if anchor is None else uses[anchor].start
            return [replace(u, focus=f) for u, f in zip(uses, ranked, strict=True)
                    if at is None or u.start < at]
        if select == "pooled" and uses:
            frac = (self.cfg.recompute_fraction if params.recompute_fraction is None
                    else params.recompute_fraction)
            plan = pooled_plan(prompt, spans, self.cfg, frac)
            return [replace(u, fraction=f, focus=c)
                    for u, (f, c) in zip(uses, plan, strict=True)]
        if select == "blend":
            return [replace(u, blend=True) for u in uses]
        return uses

    def _marked(self, prompt: Sequence[int], start: int, params: RequestParams
                ) -> tuple[list[Use], list[tuple[int, int]], list[str]]:
        assert isinstance(params.reuse, list)
        uses, misses = [], []
        cached = unstored = over = 0
        budget = self.cfg.max_store_tokens if self.cfg.store_marked else 0
        for a, b in params.reuse:
            if a < start:
                cached += 1  # inside the prefix-cache hit: nothing to reuse there
                continue
            digest = self.catalog.exact(prompt[a:b])
            if digest is not None:
                uses.append(Use(digest, a, b - a, params.recompute_fraction))
            elif b - a >= self.cfg.min_tokens and b - a <= budget:
                misses.append((a, b))
                budget -= b - a
            else:
                unstored += 1
                over += self.cfg.store_marked and b - a >= self.cfg.min_tokens
        notes = []
        if cached:
            notes.append(f"{cached} marked range(s) start inside the prefix-cache hit "
                         f"[0, {start}) and are computed")
        if misses:
            notes.append(f"{len(misses)} marked range(s) are not stored yet; computed and "
                         "stored from this request (store_marked)")
        if unstored:
            notes.append(f"{unstored} marked range(s) are not stored; computed (store them "
                         "with `redknot precompute`" + (f"; {over} beyond this request's "
                         f"reuse.max_store_tokens={self.cfg.max_store_tokens}" if over else "")
                         + ")")
        return uses, misses, notes
