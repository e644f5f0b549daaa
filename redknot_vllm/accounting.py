"""Prefill accounting: FLOPs, kept FFN tokens and reused tokens of finished steps.

Two consumers of the runtime's finished steps (:class:`redknot_vllm.step.StepState`):

* with the RedKnot connector, :class:`RequestAccounting` attributes each prefill row to
  its request by the slot of the request's first token this step (slots are unique among
  running requests; the connector's scheduler half sends ``slot -> request``), sums per
  request, and logs one line and keeps the result when a prompt is done;
* without it, :class:`WindowTotals` folds every row into one aggregate, logged every few
  seconds and handed to benchmarks by the worker extension.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from vllm.logger import init_logger

from redknot_vllm import envs
from redknot_vllm.config import RedKnotConfig, connector_config
from redknot_vllm.dims import ModelDims
from redknot_vllm.flops import AttentionShape, PrefillFlops
from redknot_vllm.step import StepState

logger = init_logger(__name__)

MAX_KEPT_RESULTS = 4096
"""Finished-request stats a worker keeps for ``request_stats`` (oldest dropped)."""
_SUFFIX = re.compile(r".+-[0-9a-f]{8}")


class FlopsModel:
    """The FLOPs formula of one model and RedKnot configuration, applied to step rows."""

    def __init__(self, config: RedKnotConfig, dims: ModelDims) -> None:
        assert config.head_config is not None
        self.dims = dims
        self.shape = AttentionShape.from_head_config(dims, config.head_config)
        sf = config.sparse_ffn
        self.sparse_layers = frozenset(
            li for li in range(dims.num_layers) if sf is not None and sf.threshold(li) < 1.0)

    def row_flops(self, step: StepState, row: int, kept_host: dict[int, list[int]]
                  ) -> PrefillFlops:
        """FLOPs of one prefill row of a finished step; ``kept_host`` is
        ``step.ffn_kept_host()`` (one transfer per step, shared by its rows)."""
        md = step.attn
        q_len = md.query_start_loc_cpu[row + 1] - md.query_start_loc_cpu[row]
        end = md.seq_lens_cpu[row]
        per_layer = {li: kept_host[li][row] if li in kept_host else q_len
                     for li in range(self.dims.num_layers)}
        sparse_kept = sum(per_layer[li] for li in self.sparse_layers)
        acc = PrefillFlops()
        tail = md.full_tail_cpu[row] if md.full_tail_cpu else 0
        acc.add_chunk(self.dims, self.shape, end - q_len, end, sum(per_layer.values()),
                      (q_len * len(self.sparse_layers), sparse_kept), tail)
        return acc


class WindowTotals:
    """Every prefill row in one aggregate (no connector), logged every few seconds."""

    def __init__(self, flops: FlopsModel, tp_rank: int) -> None:
        self.flops = flops
        self.tp_rank = tp_rank
        self.totals = PrefillFlops()
        """Rows folded since the last :meth:`take`."""
        self._window = PrefillFlops()
        self._window_start = time.monotonic()

    def fold(self, steps: Iterable[StepState]) -> None:
        for step in steps:
            kept = step.ffn_kept_host()
            for row, prefill in enumerate(step.attn.is_prefill_cpu):
                if prefill:
                    acc = self.flops.row_flops(step, row, kept)
                    self._window.merge(acc)
                    self.totals.merge(acc)
        now = time.monotonic()
        if self._window.tokens and now - self._window_start >= envs.stats_log_interval_s():
            if self.tp_rank == 0:
                logger.info(
                    "RedKnot prefill (last %.0f s, all requests): %d tokens, FFN kept %.1f%%, "
                    "prefill FLOPs saved %.1f%% (per-request stats need the RedKnot connector:"
                    " --kv-transfer-config %s)", now - self._window_start,
                    self._window.tokens, 100 * self._window.ffn_kept_fraction,
                    100 * self._window.saved_fraction, json.dumps(connector_config()))
            self._window = PrefillFlops()
            self._window_start = now

    def take(self) -> PrefillFlops:
        out, self.totals = self.totals, PrefillFlops()
        return out


class RequestAccounting:
    """Per-request prefill stats (worker half of the RedKnot connector)."""

    def __init__(self, flops: FlopsModel, tp_rank: int) -> None:
        self.flops = flops
        self.tp_rank = tp_rank
        self._acc: dict[str, PrefillFlops] = {}
        self._cached: dict[str, int] = {}
        self.results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        """Finished requests' stats, oldest first (at most :data:`MAX_KEPT_RESULTS`)."""
        self.suffixed: dict[str, list[str]] = {}
        """user-facing request id -> engine ids (vLLM appends ``-<8 hex>`` to make ids
        unique; ``RequestOutput.request_id`` is the unsuffixed one)."""

    def on_steps(self, steps: Iterable[StepState],
                 by_first_slot: dict[int, tuple[str, int, int]]) -> None:
        """Account finished steps; ``by_first_slot``: first slot this step -> (request id,
        prompt length, tokens computed before the request's first step)."""
        dims = self.flops.dims
        for step in steps:
            # reused (not computed) positions, also of requests with no computed row here
            for slot, ranges in step.reused.items():
                hit = by_first_slot.get(slot)
                if hit is not None:
                    acc = self._acc.setdefault(hit[0], PrefillFlops())
                    self._cached.setdefault(hit[0], hit[2])
                    ran = 0 if step.blend is None else step.blend.layers
                    for a, b in ranges:
                        acc.add_reused(dims, a, b, ran)
            firsts = step.first_slots()
            kept = step.ffn_kept_host()
            for row, prefill in enumerate(step.attn.is_prefill_cpu):
                hit = by_first_slot.get(firsts[row]) if prefill else None
                if hit is None:
                    continue
                req_id, prompt_len, first = hit
                self._acc.setdefault(req_id, PrefillFlops()).merge(
                    self.flops.row_flops(step, row, kept))
                self._cached.setdefault(req_id, first)
                if step.attn.seq_lens_cpu[row] >= prompt_len:
                    self._finish(req_id, prompt_len)

    def forget(self, req_ids: Iterable[str]) -> None:
        """Requests aborted mid-prompt: drop their partial sums."""
        for req_id in req_ids:
            self._acc.pop(req_id, None)
            self._cached.pop(req_id, None)

    def lookup(self, request_ids: list[str] | None) -> dict[str, dict[str, Any]]:
        """Kept results by user-facing or engine request id (None: all of them)."""
        if request_ids is None:
            return dict(self.results)
        return {rid: self.results[key] for rid in request_ids
                for key in (rid, *self.suffixed.get(rid, ())) if key in self.results}

    def _finish(self, req_id: str, prompt_len: int) -> None:
        acc = self._acc.pop(req_id)
        self.results[req_id] = {"request_id": req_id, "prompt_tokens": prompt_len,
                                "cached_tokens": self._cached.pop(req_id, 0), **acc.as_dict()}
        if _SUFFIX.fullmatch(req_id):
            self.suffixed.setdefault(req_id.rsplit("-", 1)[0], []).append(req_id)
        while len(self.results) > MAX_KEPT_RESULTS:
            old, _ = self.results.popitem(last=False)
            base = old.rsplit("-", 1)[0]
            if old in self.suffixed.get(base, ()):
                self.suffixed[base].remove(old)
                if not self.suffixed[base]:
                    del self.suffixed[base]
        if self.tp_rank == 0:
            logger.info("RedKnot request %s: %d prompt tokens (%d computed, %d reused), FFN kept "
                        "%.1f%%, prefill FLOPs saved %.1f%%", req_id, prompt_len, acc.tokens,
                        acc.reused_tokens, 100 * acc.ffn_kept_fraction,
                        100 * acc.saved_fraction)
