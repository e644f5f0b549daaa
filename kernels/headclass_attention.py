"""Head-class attention over vLLM's paged KV cache, in plain torch (CPU path and reference).

Two functions (the paged-cache access itself is :mod:`redknot_vllm.kernels.paged_kv`):

* :func:`headclass_attention_ref`: the naive masked-softmax definition, materialising
  the whole score matrix in fp32. It is the ground truth for tests.
* :func:`paged_headclass_attention`: the CPU implementation used by the RedKnot backend.
  It reads K/V from the paged cache, tiles queries, and only touches the keys a head
  class can see: global heads the causal prefix of the tile, local heads the sinks plus
  the window that the tile spans. Each (tile, head group) is one SDPA call.

Visibility for a query at absolute position ``p`` and a key at position ``k``::

    full (global / dense / retrieval, and every head of a decode row):  k <= p
    local (sink S, window W):  k <= p  and  (k < S  or  k > p - W)

so a local head sees ``min(p + 1, S + W)`` keys, sinks never counted twice.

Block-sparse retrieval (``top_k`` K, ``block`` R, window W a multiple of R): a query at
``p`` in block ``b = p // R`` sees key block 0, its window ``[max(0, b·R - W), p]`` and the
K key blocks ``j`` in ``[1, max(0, b·R - W) / R)`` scoring highest for block b; when there
are no more than K such blocks it sees its whole causal prefix. A key block's score for a
query block is ``Σ_d max(q̄_d · kmax_jd, q̄_d · kmin_jd)``, q̄ the mean query of the block's
queries in this call over the KV head's query heads, kmax/kmin the key block's per-channel
extremes (Quest's bound, with the block's mean query). It is computed as two matrix
products, ``q̄⁺ · kmax + q̄⁻ · kmin`` (:func:`block_scores`): for each channel the larger of the
two products is the one with kmax where ``q̄_d ≥ 0`` and with kmin where ``q̄_d < 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from redknot_vllm.kernels.paged_kv import gather_sequence_kv

FULL = -1
"""Window value meaning "no window" (full causal prefix)."""


@dataclass(frozen=True)
class HeadGroup:
    """KV heads of one layer that share a visibility rule."""

    kv_heads: tuple[int, ...]
    """Local (this TP rank) KV-head indices, ascending."""
    window: int
    """Sliding window W, or ``FULL``."""
    sink: int
    """Sink tokens ``[0, sink)`` a local head always sees (ignored when ``window`` is FULL)."""
    topk: int = 0
    """Block-sparse retrieval: key blocks kept per query block (0: not retrieval)."""
    block: int = 0
    """Block-sparse retrieval: positions per block (query and key blocks alike)."""

    @property
    def is_full(self) -> bool:
        return self.window == FULL and not self.topk


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """Bool ``[len(q_pos), len(k_pos)]``: True where the query may attend to the key."""
    causal = k_pos[None, :] <= q_pos[:, None]
    if window == FULL:
        return causal
    in_window = k_pos[None, :] > (q_pos[:, None] - window)
    return causal & ((k_pos[None, :] < sink) | in_window)


def headclass_attention_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_positions: torch.Tensor,
    kv_window: torch.Tensor,
    kv_sink: torch.Tensor,
    scale: float,
    full_from: int | None = None,
    retrieval: dict[int, tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """Naive head-class attention for one sequence (test reference).

    Args:
        query: ``[num_q, num_heads, head_size]``.
        key, value: ``[num_keys, num_kv_heads, head_size]``; key ``i`` is at position ``i``.
        q_positions: ``[num_q]`` int64 absolute positions of the queries.
        kv_window: ``[num_kv_heads]`` int64 window per KV head, ``FULL`` (-1) for full.
        kv_sink: ``[num_kv_heads]`` int64 sink size per KV head.
        scale: softmax scale.
        full_from: queries at positions ``>= full_from`` attend fully on every head (a
            prefill tail); None: none.
        retrieval: KV head -> (top_k, block, window) for block-sparse retrieval heads (their
            ``kv_window`` entry is ignored); the query blocks' mean queries are taken over
            the queries given here whose position is below ``full_from``.

    Returns:
        ``[num_q, num_heads, head_size]`` in fp32.
    """
    num_q, num_heads, _ = query.shape
    num_keys, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    k_pos = torch.arange(num_keys)
    out = torch.empty(num_q, num_heads, query.shape[-1], dtype=torch.float32)
    sel_masks = {kvh: _retrieval_mask_ref(query, key, q_positions, kvh, group, *params,
                                          full_from)
                 for kvh, params in (retrieval or {}).items()}
    for h in range(num_heads):
        kvh = h // group
        if kvh in sel_masks:
            mask = sel_masks[kvh].clone()
        else:
            mask = visible_mask(q_positions, k_pos, int(kv_window[kvh]), int(kv_sink[kvh]))
        if full_from is not None:
            mask |= (q_positions[:, None] >= full_from) & (k_pos[None, :] <= q_positions[:, None])
        s = (query[:, h].float() @ key[:, kvh].float().T) * scale
        s = s.masked_fill(~mask, float("-inf"))
        out[:, h] = torch.softmax(s, dim=-1) @ value[:, kvh].float()
    return out


def _retrieval_mask_ref(query: torch.Tensor, key: torch.Tensor, q_positions: torch.Tensor,
                        kvh: int, group: int, top_k: int, block: int, window: int,
                        full_from: int | None) -> torch.Tensor:
    """Bool ``[num_q, num_keys]``: what each query of a block-sparse retrieval KV head sees,
    written position by position (independent of the tiled implementation)."""
    num_keys = key.shape[0]
    k = key[:, kvh].float()
    mask = torch.zeros(len(q_positions), num_keys, dtype=torch.bool)
    heads = list(range(kvh * group, (kvh + 1) * group))
    for i, p in enumerate(q_positions.tolist()):
        b = p // block
        ws = max(0, b * block - window)
        cands = list(range(1, ws // block))
        if len(cands) <= top_k:
            mask[i, :p + 1] = True
            continue
        rows = [j for j, x in enumerate(q_positions.tolist()) if x // block == b
                and (full_from is None or x < full_from)]
        qbar = query[rows][:, heads].float().mean(dim=(0, 1))
        scores = []
        for j in cands:
            kb = k[j * block:(j + 1) * block]
            scores.append(float(torch.maximum(qbar * kb.max(0).values,
                                              qbar * kb.min(0).values).sum()))
        best = sorted(range(len(cands)), key=lambda c: -scores[c])[:top_k]
        mask[i, :block] = True
        for c in best:
            mask[i, cands[c] * block:(cands[c] + 1) * block] = True
        mask[i, ws:p + 1] = True
    return mask


def block_scores(qbar: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor) -> torch.Tensor:
    """Quest's bound of every (query block, key block) pair: ``[..., n, D]`` mean queries,
    ``[..., m, D]`` key-block extremes -> ``[..., n, m]`` fp32 scores,
    ``Σ_d max(q̄_d · kmax_d, q̄_d · kmin_d)``, as two matrix products (no ``[n, m, D]``
    intermediate; shared by the torch and CUDA paths so both rank blocks alike)."""
    qbar, kmax, kmin = qbar.float(), kmax.float(), kmin.float()
    return qbar.clamp(min=0) @ kmax.mT + qbar.clamp(max=0) @ kmin.mT


def _retrieval_group(q: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, first_pos: int,
                     g: HeadGroup, scale: float, out: torch.Tensor, kv_idx: torch.Tensor,
                     per_kv: int) -> None:
    """One block-sparse retrieval group of one sequence, tile = one query block.

    q: ``[num_q, num_kv_heads, per_kv, D]``; kg/vg: ``[Hg, seq, D]``; out as in
    :func:`sequence_headclass_attention`."""
    num_q, head_size = q.shape[0], q.shape[-1]
    seq = first_pos + num_q
    r, dev = g.block, q.device
    nkb = -(-seq // r)
    pad = nkb * r - seq
    kf = kg.float()
    kmax = F.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(len(kv_idx), nkb, r, -1).amax(2)
    kmin = F.pad(kf, (0, 0, 0, pad), value=float("inf")).view(len(kv_idx), nkb, r, -1).amin(2)
    o_view = out.view(num_q, -1, per_kv, head_size)
    for b in range(first_pos // r, (seq - 1) // r + 1):
        a, e = max(first_pos, b * r) - first_pos, min(seq, (b + 1) * r) - first_pos
        ws = max(0, b * r - g.window)
        ncand = max(0, ws // r - 1)
        q_pos = torch.arange(first_pos + a, first_pos + e, device=dev)
        qt = q[a:e, kv_idx]  # [nq, Hg, per, D]
        if ncand <= g.topk:  # the whole causal prefix
            k_pos = torch.arange(first_pos + e, device=dev)
            o = F.scaled_dot_product_attention(
                qt.reshape(e - a, -1, head_size).transpose(0, 1), kg[:, :first_pos + e],
                vg[:, :first_pos + e], attn_mask=k_pos[None, :] <= q_pos[:, None],
                scale=scale, enable_gqa=True)
            o_view[a:e, kv_idx] = o.transpose(0, 1).reshape(e - a, len(kv_idx), per_kv,
                                                            head_size).to(out.dtype)
            continue
        qbar = qt.float().mean(dim=(0, 2))  # [Hg, D]
        score = block_scores(qbar[:, None], kmax[:, 1:ncand + 1],
                             kmin[:, 1:ncand + 1])[:, 0]  # [Hg, ncand]
        sel = score.topk(g.topk, dim=-1).indices + 1  # key blocks, per KV head
        offs = torch.arange(r, device=dev)
        for hi in range(len(kv_idx)):
            k_pos = torch.cat([offs, (sel[hi].sort().values[:, None] * r + offs).reshape(-1),
                               torch.arange(ws, first_pos + e, device=dev)])
            o = F.scaled_dot_product_attention(
                qt[:, hi].transpose(0, 1), kg[hi:hi + 1, k_pos], vg[hi:hi + 1, k_pos],
                attn_mask=k_pos[None, :] <= q_pos[:, None], scale=scale, enable_gqa=True)
            o_view[a:e, kv_idx[hi]] = o.transpose(0, 1).to(out.dtype)


def sequence_headclass_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    first_pos: int,
    groups: tuple[HeadGroup, ...],
    scale: float,
    out: torch.Tensor,
    tile: int = 512,
) -> None:
    """Head-class attention of one sequence's new tokens against its whole context.

    Args:
        query: ``[num_q, num_heads, head_size]``; query ``i`` is at position ``first_pos + i``.
        key, value: ``[num_kv_heads, seq_len, head_size]`` with ``seq_len = first_pos + num_q``.
        groups: head groups covering every KV head once.
        out: ``[num_q, num_heads, head_size]``, written in place.
        tile: queries per SDPA call (bounds the mask and score memory).
    """
    num_q, num_heads, head_size = query.shape
    num_kv_heads = key.shape[0]
    per_kv = num_heads // num_kv_heads
    q = query.view(num_q, num_kv_heads, per_kv, head_size)
    dev = query.device  # CPU, or CUDA under VLLM_REDKNOT_ATTENTION=torch
    for g in groups:
        kv_idx = torch.tensor(g.kv_heads, device=dev)
        if g.topk:
            _retrieval_group(q, key[kv_idx], value[kv_idx], first_pos, g, scale, out, kv_idx,
                             per_kv)
            continue
        qg = q[:, kv_idx].reshape(num_q, -1, head_size).transpose(0, 1)  # [Hg*per, nq, D]
        kg, vg = key[kv_idx], value[kv_idx]  # [Hg, S, D]
        for a in range(0, num_q, tile):
            b = min(a + tile, num_q)
            q_pos = torch.arange(first_pos + a, first_pos + b, device=dev)
            end = first_pos + b  # keys beyond the tile's last query are never visible
            if g.window == FULL:
                k_pos = torch.arange(end, device=dev)
                ks, vs = kg[:, :end], vg[:, :end]
            else:
                sink = min(g.sink, end)
                lo = max(sink, first_pos + a - g.window + 1)
                k_pos = torch.cat([torch.arange(sink, device=dev),
                                   torch.arange(lo, end, device=dev)])
                ks = torch.cat([kg[:, :sink], kg[:, lo:end]], dim=1)
                vs = torch.cat([vg[:, :sink], vg[:, lo:end]], dim=1)
            mask = visible_mask(q_pos, k_pos, g.window, g.sink)
            o = F.scaled_dot_product_attention(
                qg[:, a:b], ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
            )  # [Hg*per, b-a, D]
            out[a:b].view(b - a, num_kv_heads, per_kv, head_size)[:, kv_idx] = (
                o.transpose(0, 1).reshape(b - a, len(g.kv_heads), per_kv, head_size)
                .to(out.dtype)
            )


def paged_headclass_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    is_prefill: list[bool],
    prefill_groups: tuple[HeadGroup, ...],
    scale: float,
    out: torch.Tensor,
    full_tail: list[int] | None = None,
    decode_groups: tuple[HeadGroup, ...] | None = None,
) -> None:
    """Attention for a mixed batch; prefill rows use head classes, other rows full causal
    (or ``decode_groups``).

    Args:
        query: ``[num_tokens, num_heads, head_size]``.
        kv_cache: logical ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, already
            holding this step's K/V.
        block_table: ``[num_reqs, max_blocks]``.
        query_start_loc: ``num_reqs + 1`` token offsets of each row.
        seq_lens: ``num_reqs`` context lengths including this step's tokens.
        is_prefill: ``num_reqs`` flags; False rows (decode) attend fully.
        prefill_groups: the layer's head groups for prefill rows.
        out: ``[num_tokens, num_heads, head_size]``, written in place.
        full_tail: per row, how many of a prefill row's last tokens attend fully.
        decode_groups: the head groups of decode rows (SegPaged's local layer: its heads
            decode by class, because the pages outside their sinks and window are freed;
            a prefill row's full tail would take them too); None: every head full.
    """
    head_size = query.shape[-1]
    num_kv_heads = kv_cache.shape[1]
    full = decode_groups or (HeadGroup(tuple(range(num_kv_heads)), FULL, 0),)
    for r, seq_len in enumerate(seq_lens):
        a, b = query_start_loc[r], query_start_loc[r + 1]
        if b == a:
            continue
        k, v = gather_sequence_kv(kv_cache, block_table[r], seq_len, head_size)
        first = seq_len - (b - a)
        # the row's head-class part, then the tokens that attend fully (all of a decode row)
        m = max(0, b - a - (full_tail[r] if full_tail else 0)) if is_prefill[r] else 0
        if m > 0:
            sequence_headclass_attention(query[a:a + m], k[:, :first + m], v[:, :first + m],
                                         first, prefill_groups, scale, out[a:a + m])
        if m < b - a:
            sequence_headclass_attention(query[a + m:b], k, v, first + m, full, scale,
                                         out[a + m:b])
