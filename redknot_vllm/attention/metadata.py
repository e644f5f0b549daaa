"""RedKnot's per-step attention metadata: attention data only, planned once per step.

Host copies of device tensors carry vLLM's ``*_cpu`` suffix (here plain lists, read on the
host without a transfer)::

    row r:   |<------ seq_lens_cpu[r] keys in the cache after this step ------>|
             |<- context (computed before) ->|<- query_len = this step's tokens ->|
                                             ^ query_start_loc_cpu[r] in the batch

A row is *prefill* while its request is still in its prompt (``is_prefill_cpu``); prefill
rows attend per head class, the other rows (decode) attend fully, and so do the last
``full_tail_cpu[r]`` tokens of a prefill row (the head config's ``tail_full_tokens``: for a
prompt sent whole, its question). Together those are the step's *full* tokens::

    row r (prefill):  | head-class tokens ........................ | tail (full) |
    row s (decode):   | full |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RedKnotAttentionMetadata:
    """One step's attention layout, shared by every RedKnot layer of a KV-cache group.

    Token-level fields are built only when the step has prefill rows (``has_prefill``).
    """

    num_actual_tokens: int  # Number of tokens excluding padding.
    num_reqs: int
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32 token offsets of each row
    seq_lens: torch.Tensor  # [num_reqs] int32 context lengths including this step
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]  # num_reqs + 1, host copy of query_start_loc
    seq_lens_cpu: list[int]  # num_reqs, host copy of seq_lens
    is_prefill_cpu: list[bool]  # num_reqs: the row's request is still in its prompt
    has_prefill: bool
    token_row: torch.Tensor | None = None  # [num_actual_tokens] int64 row of each token
    token_pos: torch.Tensor | None = None  # [num_actual_tokens] int64 absolute position
    token_is_prefill: torch.Tensor | None = None  # [num_actual_tokens] bool
    full_tail_cpu: list[int] | None = None  # num_reqs: a prefill row's last tokens, full
    num_full_tokens: int = 0  # tokens that attend fully on every head (decode rows + tails)
    full_prefix_rows: int | None = None  # they are exactly whole rows [0, this) if not None
    max_full_query_len: int = 0
    full_rows: torch.Tensor | None = None  # [n] int64 their rows (when not a prefix)
    full_token_index: torch.Tensor | None = None  # [m] int64 their tokens (not a prefix)
    full_query_start_loc: torch.Tensor | None = None  # [n + 1] int32 (when not a prefix)
    retrieval_layouts: dict[tuple[int, int, int, int], Any] = field(default_factory=dict)
    """Block-sparse retrieval: the step's query-block layout per (block, window, top_k,
    page), built on the host once per step by the first layer that needs it."""
    fa: Any = None
    """CUDA, steps without prefill rows: vLLM's own ``FlashAttentionMetadata`` (decode runs
    as dense vLLM does, full CUDA graphs included)."""


def build_metadata(*, query_start_loc_cpu: list[int], seq_lens_cpu: list[int],
                   is_prefill_cpu: list[bool], block_table: torch.Tensor,
                   slot_mapping: torch.Tensor, device: torch.device,
                   query_start_loc: torch.Tensor | None = None,
                   seq_lens: torch.Tensor | None = None, max_query_len: int | None = None,
                   max_seq_len: int | None = None, num_actual_tokens: int | None = None,
                   full_tail_cpu: list[int] | None = None,
                   token_fields: bool = False) -> RedKnotAttentionMetadata:
    """The metadata of a batch given by its host layout.

    ``query_start_loc`` / ``seq_lens`` (their maxima, the token count) are vLLM's own when
    the builder has them; otherwise they are derived from the host lists (one non-blocking transfer
    each). ``full_tail_cpu``: per row, how many of its last tokens attend fully (prefill
    rows; capped at the row's length; None: none). ``token_fields``: build the per-token
    fields even without prefill rows (SegPaged's local layer decodes by head class).
    """
    num_reqs = len(seq_lens_cpu)
    q_lens = [query_start_loc_cpu[i + 1] - query_start_loc_cpu[i] for i in range(num_reqs)]
    if query_start_loc is None:
        query_start_loc = torch.tensor(query_start_loc_cpu, dtype=torch.int32).to(
            device, non_blocking=True)
    if seq_lens is None:
        seq_lens = torch.tensor(seq_lens_cpu, dtype=torch.int32).to(device, non_blocking=True)
    md = RedKnotAttentionMetadata(
        num_actual_tokens=(query_start_loc_cpu[-1] if num_actual_tokens is None
                           else num_actual_tokens),
        num_reqs=num_reqs,
        block_table=block_table,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        max_query_len=max(q_lens, default=0) if max_query_len is None else max_query_len,
        max_seq_len=max(seq_lens_cpu, default=0) if max_seq_len is None else max_seq_len,
        query_start_loc_cpu=query_start_loc_cpu,
        seq_lens_cpu=seq_lens_cpu,
        is_prefill_cpu=is_prefill_cpu,
        has_prefill=any(is_prefill_cpu),
        full_tail_cpu=None if full_tail_cpu is None else [
            min(t, q) if p else 0 for t, q, p in zip(full_tail_cpu, q_lens, is_prefill_cpu,
                                                     strict=True)],
    )
    if (md.has_prefill or token_fields) and md.num_actual_tokens:
        _add_token_fields(md, q_lens, device)
    return md


def _add_token_fields(md: RedKnotAttentionMetadata, q_lens: list[int],
                      dev: torch.device) -> None:
    """Per-token maps and the decode-row layout, built on the host, copied once."""
    n = md.num_actual_tokens
    rows = torch.arange(md.num_reqs).repeat_interleave(torch.tensor(q_lens))
    ends = torch.tensor(md.query_start_loc_cpu[1:])[rows]
    pos = torch.tensor(md.seq_lens_cpu)[rows] - ends + torch.arange(n)
    prefill = torch.tensor(md.is_prefill_cpu, dtype=torch.bool)[rows]
    # one transfer; rows padded to an even length so that each field starts 16-byte
    # aligned, as Triton specialises pointer alignment (an odd token count would otherwise
    # compile another variant of the sink-merge kernel mid-traffic)
    packed = torch.zeros(3, n + n % 2, dtype=torch.long)
    packed[0, :n], packed[1, :n], packed[2, :n] = rows, pos, prefill
    packed = packed.to(dev, non_blocking=True)
    md.token_row, md.token_pos = packed[0, :n], packed[1, :n]
    md.token_is_prefill = packed[2, :n].bool()
    tails = md.full_tail_cpu or [0] * md.num_reqs
    # per row, how many of its last tokens attend fully: all of a decode row, a prefill
    # row's tail
    full = [t if p else q for t, q, p in zip(tails, q_lens, md.is_prefill_cpu, strict=True)]
    rows = [r for r, f in enumerate(full) if f]
    if not rows:
        return
    md.num_full_tokens = sum(full[r] for r in rows)
    md.max_full_query_len = max(full[r] for r in rows)
    if rows == list(range(len(rows))) and all(full[r] == q_lens[r] for r in rows):
        md.full_prefix_rows = len(rows)  # whole rows leading the batch: plain slices
        return
    idx = torch.cat([torch.arange(md.query_start_loc_cpu[r + 1] - full[r],
                                  md.query_start_loc_cpu[r + 1]) for r in rows])
    cu = torch.tensor([0] + [full[r] for r in rows]).cumsum(0).to(torch.int32)
    md.full_rows = torch.tensor(rows).to(dev, non_blocking=True)
    md.full_token_index = idx.to(dev, non_blocking=True)
    md.full_query_start_loc = cu.to(dev, non_blocking=True)


def tokens_to_row_end(md: RedKnotAttentionMetadata) -> torch.Tensor:
    """``[num_actual_tokens]`` int64: tokens after each one in its row (0 = the row's last),
    derived on the device from ``token_row`` and ``query_start_loc`` (no host sync)."""
    assert md.token_row is not None, "token fields exist only for steps with prefill rows"
    ends = md.query_start_loc.long()[md.token_row + 1]
    return ends - 1 - torch.arange(md.num_actual_tokens, device=ends.device)


def first_slots(md: RedKnotAttentionMetadata) -> list[int]:
    """Per row, the slot of its first token this step (one transfer)."""
    if not md.num_reqs:
        return []
    return md.slot_mapping[torch.tensor(md.query_start_loc_cpu[:-1])].tolist()


def restrict_tokens(md: RedKnotAttentionMetadata, keep: torch.Tensor,
                    firsts: list[int] | None = None
                    ) -> tuple[RedKnotAttentionMetadata, torch.Tensor, list[int]]:
    """Metadata for computing only the kept tokens of a prefill step (KV reuse).

    Every maximal run of kept tokens of a row becomes a row of its own, with the row's block
    table and ``seq_len`` = the position after the run's last token, so each run attends
    causally to everything before it: KV spliced into the cache for the dropped tokens, and
    the run's own fresh KV. ``keep`` is a host bool ``[num_actual_tokens]``; ``firsts``:
    :func:`first_slots` of ``md`` when the caller has them (saves a transfer).

    Returns:
        (metadata, kept token indices on the device, per new row the slot of its
        original row's first token, by which the connector knows the request).
    """
    assert keep.device.type == "cpu" and keep.numel() == md.num_actual_tokens
    if firsts is None:
        firsts = first_slots(md)
    tails = md.full_tail_cpu or [0] * md.num_reqs
    qsl, rows, seq_lens, prefill, row_first_slots, new_tails = [0], [], [], [], [], []
    for r in range(md.num_reqs):
        a, b = md.query_start_loc_cpu[r], md.query_start_loc_cpu[r + 1]
        k = keep[a:b]
        if bool(k.all()):
            runs = [(0, b - a)]
        else:
            edges = torch.diff(k.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                               append=torch.zeros(1, dtype=torch.int8))
            starts = (edges == 1).nonzero().flatten().tolist()
            ends = (edges == -1).nonzero().flatten().tolist()
            runs = list(zip(starts, ends, strict=True))
        end_pos = md.seq_lens_cpu[r] - (b - a)  # position of the row's first token
        for s, e in runs:
            qsl.append(qsl[-1] + e - s)
            rows.append(r)
            seq_lens.append(end_pos + e)
            prefill.append(md.is_prefill_cpu[r])
            row_first_slots.append(firsts[r])
            new_tails.append(tails[r] if e == b - a else 0)  # the run ending the row
    dev = md.slot_mapping.device
    kept = keep.nonzero().flatten().to(dev, non_blocking=True)
    out = build_metadata(
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, is_prefill_cpu=prefill,
        block_table=md.block_table[torch.tensor(rows, device=md.block_table.device)],
        slot_mapping=md.slot_mapping[kept], device=dev,
        full_tail_cpu=new_tails if md.full_tail_cpu is not None else None,
        token_fields=md.token_row is not None)  # SegPaged's local group reads them
    return out, kept, row_first_slots
