"""Scheduler side: where each running request's tokens live, and the slot that names it.

The connector's scheduler half tells its worker half which request each batch row belongs
to by the KV slot of the request's first token this step (slots are unique among running
requests). This tracker keeps each request's block ids and prompt length across steps from
vLLM's ``SchedulerOutput`` (read through :func:`redknot_vllm.compat.scheduled_requests`).
"""

from __future__ import annotations

from dataclasses import dataclass

from redknot_vllm.compat import ScheduledRequest


@dataclass(frozen=True)
class PromptStep:
    """One request's part of a step while it is still in its prompt."""

    req_id: str
    first_slot: int
    """Slot of the request's first token this step."""
    start: int
    """Position of that token."""
    end: int
    """Position after the step's last token of the request."""
    prompt_len: int
    num_cached: int
    """Tokens computed before the request's first step (e.g. a prefix-cache hit)."""
    block_ids: tuple[int, ...]


class RequestTracker:
    """Block ids and prompt lengths of running requests (see the module docstring)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: dict[str, list[int]] = {}
        self._prompt: dict[str, tuple[int, int]] = {}

    def update(self, req: ScheduledRequest) -> PromptStep | None:
        """Record a scheduled request; its prompt step, or None once it is decoding."""
        if req.prompt_len is not None:  # new this step
            self._prompt[req.req_id] = (req.prompt_len, req.num_computed_tokens)
        elif req.replaces_blocks:  # resumed after preemption
            prompt_len = self._prompt.get(req.req_id, (0, 0))[0]
            self._prompt[req.req_id] = (prompt_len, req.num_computed_tokens)
        if req.replaces_blocks:
            self._blocks[req.req_id] = list(req.block_ids or [])
        elif req.block_ids:
            self._blocks.setdefault(req.req_id, []).extend(req.block_ids)
        prompt_len, first = self._prompt.get(req.req_id, (0, 0))
        blocks = self._blocks.get(req.req_id, [])
        pos, bs = req.num_computed_tokens, self.block_size
        if pos >= prompt_len or pos // bs >= len(blocks):
            return None  # decoding: nothing to account
        return PromptStep(req.req_id, blocks[pos // bs] * bs + pos % bs, pos,
                          pos + req.num_scheduled_tokens, prompt_len, first, tuple(blocks))

    def forget(self, req_id: str) -> None:
        self._blocks.pop(req_id, None)
        self._prompt.pop(req_id, None)
