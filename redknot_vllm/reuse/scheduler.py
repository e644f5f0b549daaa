"""Scheduler half of reuse: plan each request's segments once, salt its block hashes, and
say per step which segments and captures the worker meets."""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from redknot_vllm import compat
from redknot_vllm.logs import RateLimited
from redknot_vllm.reuse.catalog import SegmentCatalog
from redknot_vllm.reuse.keys import ReuseSetup
from redknot_vllm.reuse.params import Capture, Use, request_params

logger = init_logger(__name__)


class ReuseScheduler:
    """Per-request reuse plans (driven by the connector's scheduler half)."""

    def __init__(self, setup: ReuseSetup, block_size: int) -> None:
        self.catalog = SegmentCatalog(setup)
        self.cfg = setup.cfg
        self.block_size = block_size
        self.log = RateLimited(logger)
        self._uses: dict[str, list[Use]] = {}
        # per request: (prompt, probe, ranges to store, behind the store context)
        self._captures: dict[str, tuple[tuple[int, ...], tuple[str, int] | None,
                                        tuple[tuple[int, int], ...], bool]] = {}

    def plan(self, request: Any, num_computed_tokens: int) -> None:
        """Plan a request the first time the scheduler looks at it (later calls are no-ops,
        as vLLM may ask again while the request waits). Never raises: a failure is logged
        and the request is computed without reuse."""
        rid = request.request_id
        if rid in self._uses:
            return
        try:
            self._plan(request, num_computed_tokens)
        except Exception as e:
            self._uses[rid] = []
            self._captures.pop(rid, None)
            self.log.error("plan-failed", "RedKnot request %s: reuse planning failed (%s: %s); "
                           "it is computed without reuse", rid, type(e).__name__, e,
                           exc_info=True)

    def _plan(self, request: Any, num_computed_tokens: int) -> None:
        rid = request.request_id
        sp = request.sampling_params
        prompt = request.prompt_token_ids or []
        params = request_params(
            request.kv_transfer_params, request_id=rid, prompt_len=len(prompt), cfg=self.cfg,
            stored_length=self.catalog.length_of, log=self.log,
            wants_prompt_logprobs=sp is not None and sp.prompt_logprobs is not None)
        uses, misses, notes = self.catalog.plan(prompt, num_computed_tokens, params)
        self._uses[rid] = uses
        if notes:
            self.log.info("marked", "RedKnot request %s: %s", rid, "; ".join(notes))
        if uses:
            salt = "|".join(["redknot-reuse", repr(self.cfg),
                             *(f"{u.digest}@{u.start}~{u.fraction}"
                               # a question-chosen recompute set is part of what was computed
                               + (f"~{','.join(map(str, u.focus))}" if u.focus else "")
                               # so is one chosen from the request's own KV
                               + ("~blend" if u.blend else "")
                               for u in uses)])
            compat.salt_block_hashes(request, num_computed_tokens // self.block_size, salt)
            logger.info("RedKnot request %s reuses %d stored segment(s), %d of %d prompt "
                        "tokens", rid, len(uses), sum(u.length for u in uses), len(prompt))
        if params.store_after:  # behind reuse.store_context: only the document is stored
            misses = [(params.store_after, len(prompt))]
        if params.store or params.probe is not None or misses:
            self._captures[rid] = (tuple(prompt), params.probe, tuple(misses),
                                   params.store_after > 0)

    def uses_in(self, req_id: str, start: int, end: int) -> list[Use]:
        """The request's segments overlapping positions ``[start, end)``."""
        return [u for u in self._uses.get(req_id, ())
                if u.start < end and u.start + u.length > start]

    def capturing(self, req_id: str) -> bool:
        """Whether the request's prompt KV is read back when its prompt is done."""
        return req_id in self._captures

    def capture(self, req_id: str, end: int, prompt_len: int,
                block_ids: tuple[int, ...]) -> Capture | None:
        """What to read back after this step, if the request's prompt finishes in it."""
        if req_id not in self._captures or end < prompt_len:
            return None
        ids, probe, ranges, behind = self._captures[req_id]
        return Capture(req_id, ids, block_ids, probe, ranges, behind)

    def forget(self, req_id: str) -> None:
        self._uses.pop(req_id, None)
        self._captures.pop(req_id, None)
