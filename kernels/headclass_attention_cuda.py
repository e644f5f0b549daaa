"""Head-class prefill attention on CUDA: FA3 over vLLM's paged KV cache, per head group.

Heads are regrouped at load time so that each group is a contiguous KV-head range
(``redknot_vllm.attention.plan``); a group is then a strided view and costs no copy.

* full group (global / dense / retrieval heads): one causal FA3 call over every row;
* local group (sink ``S``, window ``W``):

  1. a causal sliding-window FA3 call, window ``(W - 1, 0)``, written straight into the
     group's output, returning the LSE;
  2. :func:`sink_merge` (a Triton kernel) adds, in place, the sink keys
     ``j < min(S, p - W + 1)`` (exactly the sinks the window does not already cover, so no
     key counts twice) by an LSE merge;
  3. the step's *full* tokens (decode rows, and each prefill row's tail when the head
     config sets ``tail_full_tokens``) attend fully: one more causal FA3 call over just
     those tokens, written over the group's output (a slice when they are whole decode rows
     leading the batch, as vLLM's reorder puts them).

* block-sparse retrieval group (:func:`_retrieval_group_cuda`): each prefill row's query
  blocks become rows of one FA3 varlen call per KV head, over a virtual block table (key
  block 0, the blocks selected on the device, the window), then the full tokens as above.

:func:`sink_merge_ref` is the torch reference of the kernel; the end-to-end references are
``headclass_attention.headclass_attention_ref`` and, for retrieval groups, the torch path
``headclass_attention.paged_headclass_attention``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.triton_utils import tl, triton

from redknot_vllm.kernels.headclass_attention import FULL, HeadGroup, block_scores


# The per-step sizes (token count, the LSE row stride it sets, the block-table row stride) are
# not specialised: Triton would compile a new variant each time their divisibility by 16
# changes, stalling serving for seconds mid-traffic.
@triton.jit(do_not_specialize=["num_tokens", "stride_lh", "stride_br"])
def _sink_merge_kernel(
    out_ptr, stride_ot, stride_oh,
    ow_ptr, stride_wt, stride_wh,
    lse_ptr, stride_lh,
    q_ptr, stride_qt, stride_qh,
    k_ptr, v_ptr, stride_kb, stride_kn, stride_kh,
    block_table_ptr, stride_br,
    token_row_ptr, token_pos_ptr, token_prefill_ptr,
    num_tokens, scale, window, sink,
    PER: tl.constexpr, PER_PAD: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr,
    PAGE: tl.constexpr, TB: tl.constexpr, ALL_TOKENS: tl.constexpr,
):
    # One program per (block of TB tokens, KV head of the group): each token's PER query
    # heads. out/ow/q: [T, Hq_g, D] (strided; out may alias ow); lse: [Hq_g, T] fp32;
    # k/v: [blocks, PAGE, Hkv_g, D]. Tokens that see no sink (p < W) are left as they are.
    g = tl.program_id(1)
    hi = tl.arange(0, PER_PAD)
    hmask = hi < PER
    hq = g * PER + hi
    d = tl.arange(0, D)
    j = tl.arange(0, S_PAD)
    for i in tl.static_range(TB):
        t = tl.program_id(0).to(tl.int64) * TB + i
        if t < num_tokens:
            pos = tl.load(token_pos_ptr + t)
            prefill = tl.load(token_prefill_ptr + t)
            if ((prefill != 0) | ALL_TOKENS) & (pos - window + 1 > 0):
                row = tl.load(token_row_ptr + t).to(tl.int64)
                jmask = (j < sink) & (j < pos - window + 1)
                blk = tl.load(block_table_ptr + row * stride_br + j // PAGE, mask=jmask,
                              other=0).to(tl.int64)
                kv_off = (blk[:, None] * stride_kb + (j % PAGE)[:, None] * stride_kn
                          + g * stride_kh + d[None, :])
                k = tl.load(k_ptr + kv_off, mask=jmask[:, None], other=0.0).to(tl.float32)
                v = tl.load(v_ptr + kv_off, mask=jmask[:, None], other=0.0).to(tl.float32)
                q = tl.load(q_ptr + t * stride_qt + hq[:, None] * stride_qh + d[None, :],
                            mask=hmask[:, None], other=0.0).to(tl.float32)
                s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [PER_PAD, S_PAD]
                s = tl.where(jmask[None, :], s, float("-inf"))
                lse_w = tl.load(lse_ptr + hq * stride_lh + t, mask=hmask, other=0.0)
                m = tl.maximum(lse_w, tl.max(s, axis=1))
                p = tl.exp(s - m[:, None])
                pw = tl.exp(lse_w - m)
                denom = pw + tl.sum(p, axis=1)
                o_w = tl.load(ow_ptr + t * stride_wt + hq[:, None] * stride_wh + d[None, :],
                              mask=hmask[:, None], other=0.0).to(tl.float32)
                o = (pw[:, None] * o_w + tl.sum(p[:, :, None] * v[None, :, :], axis=1))
                o = o / denom[:, None]
                tl.store(out_ptr + t * stride_ot + hq[:, None] * stride_oh + d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])


_SINK_TB = 16


def sink_merge(out: torch.Tensor, o_window: torch.Tensor, lse_window: torch.Tensor,
               query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               block_table: torch.Tensor, token_row: torch.Tensor, token_pos: torch.Tensor,
               token_is_prefill: torch.Tensor, window: int, sink: int, scale: float,
               all_tokens: bool = False) -> None:
    """Merge the sink keys into a local group's sliding-window output (prefill tokens, or
    every token with ``all_tokens``: SegPaged's local layer, whose decode rows attend by
    head class too).

    Only those tokens at positions ``p >= W`` (the ones whose window misses a sink) are
    written; ``out`` may be ``o_window`` itself (in-place merge).

    Args:
        out: ``[T, Hq_g, D]`` destination (may be a strided head slice).
        o_window: ``[T, Hq_g, D]`` window-pass output; lse_window: ``[Hq_g, T]`` fp32.
        query: ``[T, Hq_g, D]``; key_cache/value_cache: ``[blocks, page, Hkv_g, D]``.
        token_row, token_pos: ``[T]`` int32 row and absolute position of each token.
        token_is_prefill: ``[T]`` bool; other tokens are left untouched.
    """
    num_tokens, hq, d = query.shape
    hkv = key_cache.shape[2]
    if num_tokens == 0:
        return
    for name, x in (("out", out), ("o_window", o_window), ("query", query),
                    ("key_cache", key_cache), ("value_cache", value_cache)):
        assert x.stride(-1) == 1, f"{name} needs a unit stride in its last dim: {x.stride()}"
    assert lse_window.stride(1) == 1, f"lse_window must be [H, T] row-major: {lse_window.stride()}"
    assert d & (d - 1) == 0, f"head size {d} must be a power of two for the sink kernel"
    per = hq // hkv
    _sink_merge_kernel[(triton.cdiv(num_tokens, _SINK_TB), hkv)](
        out, out.stride(0), out.stride(1),
        o_window, o_window.stride(0), o_window.stride(1),
        lse_window, lse_window.stride(0),
        query, query.stride(0), query.stride(1),
        key_cache, value_cache, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_table, block_table.stride(0),
        token_row, token_pos, token_is_prefill,
        num_tokens, scale, window, sink,
        PER=per, PER_PAD=triton.next_power_of_2(per), S_PAD=triton.next_power_of_2(max(sink, 1)),
        D=d, PAGE=key_cache.shape[1], TB=_SINK_TB, ALL_TOKENS=all_tokens,
    )


def warm_up_sink_merge(num_q_per_kv: int, head_size: int, page: int,
                       groups: set[tuple[int, int]], dtype: torch.dtype,
                       device: torch.device) -> None:
    """Compile the sink-merge kernel for each (window, sink) a model's local groups use
    before traffic comes, on a two-token dummy batch (Triton specialises the window's
    divisibility, so the real windows are passed)."""
    g = torch.Generator(device=device).manual_seed(0)
    for window, sink in sorted(groups):
        q = torch.randn(2, num_q_per_kv, head_size, device=device, dtype=dtype, generator=g)
        kc = torch.randn(1, page, 1, head_size, device=device, dtype=dtype, generator=g)
        lse = torch.zeros(num_q_per_kv, 2, device=device, dtype=torch.float32)
        out = torch.zeros_like(q)
        for all_tokens in (False, True):
            sink_merge(out, out, lse, q, kc, kc.clone(),
                       torch.zeros(1, 1, dtype=torch.int32, device=device),
                       torch.zeros(2, dtype=torch.long, device=device),
                       torch.tensor([page - 1, page - 1], device=device),
                       torch.ones(2, dtype=torch.bool, device=device), window, sink, 1.0,
                       all_tokens=all_tokens)


def sink_merge_ref(o_window: torch.Tensor, lse_window: torch.Tensor, query: torch.Tensor,
                   key_cache: torch.Tensor, value_cache: torch.Tensor,
                   block_table: torch.Tensor, token_row: torch.Tensor, token_pos: torch.Tensor,
                   token_is_prefill: torch.Tensor, window: int, sink: int, scale: float,
                   out: torch.Tensor, all_tokens: bool = False) -> torch.Tensor:
    """Torch reference of :func:`sink_merge` (fp32 math): returns ``out`` with the prefill
    tokens (every token with ``all_tokens``) that see a sink replaced by the merge."""
    num_tokens, hq = query.shape[:2]
    hkv, page = key_cache.shape[2], key_cache.shape[1]
    per = hq // hkv
    res = out.clone()
    for t in range(num_tokens):
        if not (all_tokens or bool(token_is_prefill[t])):
            continue
        row, pos = int(token_row[t]), int(token_pos[t])
        n = max(0, min(sink, pos - window + 1))
        if n == 0:
            continue  # the window already saw every sink: out is the window output
        o = o_window[t].float()
        js = torch.arange(n, device=query.device)
        blocks = block_table[row, js // page].long()
        k = key_cache[blocks, js % page].float()  # [n, Hkv, D]
        v = value_cache[blocks, js % page].float()
        k = k.repeat_interleave(per, dim=1)
        v = v.repeat_interleave(per, dim=1)
        s = torch.einsum("hd,nhd->hn", query[t].float(), k) * scale
        lse_s = torch.logsumexp(s, dim=-1)
        o_s = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)
        lw = lse_window[:, t].float()
        m = torch.maximum(lw, lse_s)
        ww, ws = torch.exp(lw - m), torch.exp(lse_s - m)
        o = (ww[:, None] * o + ws[:, None] * o_s) / (ww + ws)[:, None]
        res[t] = o.to(res.dtype)
    return res


def _fa() -> tuple[Any, int]:
    from vllm.v1.attention.backends.fa_utils import (
        flash_attn_varlen_func,
        get_flash_attn_version,
    )

    return flash_attn_varlen_func, get_flash_attn_version() or 3


def paged_headclass_attention_cuda(query: torch.Tensor, kv_cache: torch.Tensor, md: Any,
                                   groups: tuple[HeadGroup, ...], scale: float,
                                   out: torch.Tensor) -> None:
    """Head-class attention of a mixed batch on CUDA (see the module docstring).

    Args:
        query: ``[T, Hq, D]``; out: ``[T, Hq, D]`` written in place.
        kv_cache: logical ``[blocks, Hkv, page, 2 * D]`` (already holding this step's KV).
        md: :class:`redknot_vllm.attention.backend.RedKnotAttentionMetadata` with its device
            fields (``query_start_loc``, ``seq_lens``, ``token_row``, ``token_pos``, ...).
    """
    flash_attn_varlen_func, fa_version = _fa()
    num_heads, d = query.shape[1:]
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)  # [B, page, H, D]
    per = num_heads // kv_cache.shape[1]
    if not md.has_prefill:  # pure decode: every head full, one call as in dense vLLM
        groups = (HeadGroup(tuple(range(kv_cache.shape[1])), FULL, 0),)
    for g in groups:
        h0, h1 = g.kv_heads[0], g.kv_heads[-1] + 1
        assert g.kv_heads == tuple(range(h0, h1)), f"head group {g.kv_heads} not contiguous"
        q = query[:, h0 * per:h1 * per]
        o = out[:, h0 * per:h1 * per]
        kc, vc = key_cache[:, :, h0:h1], value_cache[:, :, h0:h1]
        common = dict(softmax_scale=scale, causal=True, fa_version=fa_version)
        if g.topk:  # block-sparse retrieval, then the step's full tokens over it
            _retrieval_group_cuda(flash_attn_varlen_func, q, kc, vc, o, md, g, per, common)
            if md.num_full_tokens:
                _full_tokens(flash_attn_varlen_func, q, kc, vc, o, md, common)
            continue
        if g.window == FULL:
            flash_attn_varlen_func(q=q, k=kc, v=vc, out=o, cu_seqlens_q=md.query_start_loc,
                                   max_seqlen_q=md.max_query_len, seqused_k=md.seq_lens,
                                   max_seqlen_k=md.max_seq_len, block_table=md.block_table,
                                   **common)
            continue
        # the window pass writes the group's output in place; the sinks merge into it
        _, lse_w = flash_attn_varlen_func(
            q=q, k=kc, v=vc, out=o, cu_seqlens_q=md.query_start_loc, max_seqlen_q=md.max_query_len,
            seqused_k=md.seq_lens, max_seqlen_k=md.max_seq_len, block_table=md.block_table,
            window_size=[g.window - 1, 0], return_softmax_lse=True, **common)
        if g.sink > 0:
            sink_merge(o, o, lse_w, q, kc, vc, md.block_table, md.token_row, md.token_pos,
                       md.token_is_prefill, g.window, g.sink, scale)
        if md.num_full_tokens:
            _full_tokens(flash_attn_varlen_func, q, kc, vc, o, md, common)


def local_attention_cuda(query: torch.Tensor, kv_cache: torch.Tensor, md: Any,
                         groups: tuple[HeadGroup, ...], scale: float,
                         out: torch.Tensor) -> None:
    """SegPaged's local layer on CUDA: every row, prefill and decode alike, attends by
    head class (sinks + window), because the pages between its sinks and its window are
    freed (their block-table entries are vLLM's null block, which the window pass never
    lets count). Per group one sliding-window FA3 call over all rows, then the sink merge
    of every token; no full pass (SegPaged refuses ``tail_full_tokens``).

    ``md`` needs the token fields even in a decode-only step (the local group's builder
    always builds them).
    """
    flash_attn_varlen_func, fa_version = _fa()
    num_heads, d = query.shape[1:]
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)  # [B, page, H, D]
    per = num_heads // kv_cache.shape[1]
    for g in groups:
        if g.window == FULL or g.topk:
            raise NotImplementedError(f"SegPaged's local layer got a non-local head group "
                                      f"{g}; it holds local heads only")
        h0, h1 = g.kv_heads[0], g.kv_heads[-1] + 1
        assert g.kv_heads == tuple(range(h0, h1)), f"head group {g.kv_heads} not contiguous"
        q, o = query[:, h0 * per:h1 * per], out[:, h0 * per:h1 * per]
        kc, vc = key_cache[:, :, h0:h1], value_cache[:, :, h0:h1]
        _, lse_w = flash_attn_varlen_func(
            q=q, k=kc, v=vc, out=o, cu_seqlens_q=md.query_start_loc,
            max_seqlen_q=md.max_query_len, seqused_k=md.seq_lens, max_seqlen_k=md.max_seq_len,
            block_table=md.block_table, window_size=[g.window - 1, 0],
            return_softmax_lse=True, softmax_scale=scale, causal=True, fa_version=fa_version)
        if g.sink > 0:
            sink_merge(o, o, lse_w, q, kc, vc, md.block_table, md.token_row, md.token_pos,
                       md.token_is_prefill, g.window, g.sink, scale, all_tokens=True)


def _full_tokens(fa: Any, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                 o: torch.Tensor, md: Any, common: dict[str, Any]) -> None:
    """Full attention for a local group's full tokens (each row's last ones, so FA's
    bottom-right causal alignment gives them the whole causal prefix)."""
    if md.full_prefix_rows is not None:  # whole decode rows lead the batch: plain slices
        r, n = md.full_prefix_rows, md.num_full_tokens
        fa(q=q[:n], k=kc, v=vc, out=o[:n], cu_seqlens_q=md.query_start_loc[:r + 1],
           max_seqlen_q=md.max_full_query_len, seqused_k=md.seq_lens[:r],
           max_seqlen_k=md.max_seq_len, block_table=md.block_table[:r], **common)
        return
    idx, rows = md.full_token_index, md.full_rows
    res = fa(q=q[idx], k=kc, v=vc, cu_seqlens_q=md.full_query_start_loc,
             max_seqlen_q=md.max_full_query_len, seqused_k=md.seq_lens[rows],
             max_seqlen_k=md.max_seq_len, block_table=md.block_table[rows], **common)
    o[idx] = res


# ------------------------------------------------------------ block-sparse retrieval
class RetrievalLayout:
    """One step's query blocks for a block-sparse retrieval group (host-built, then copied
    once): every prefill row's head-class tokens (its tail excluded) cut into blocks of
    ``block`` positions, each block a "row" of a virtual FA3 batch whose block table lists
    key block 0's pages, ``top_k`` selected blocks' pages (filled per layer and head on
    the device) and its window's pages, or, for a block with at most ``top_k`` candidate
    blocks, its whole prefix (see ``headclass_attention``'s module docstring)."""

    def __init__(self, md: Any, block: int, window: int, top_k: int, page: int,
                 device: torch.device) -> None:
        if block % page:
            raise NotImplementedError(f"retrieval_blocks.block={block} is not a multiple of "
                                      f"the KV-cache page size {page}")
        bp = block // page
        tails = md.full_tail_cpu or [0] * md.num_reqs
        token_idx: list[torch.Tensor] = []
        cols: list[tuple[np.ndarray, ...]] = []  # per row: row, first, end, window start
        for r in range(md.num_reqs):
            if not md.is_prefill_cpu[r]:
                continue
            qs, qe = md.query_start_loc_cpu[r], md.query_start_loc_cpu[r + 1]
            m = qe - qs - tails[r]
            if m <= 0:
                continue
            first = md.seq_lens_cpu[r] - (qe - qs)
            token_idx.append(torch.arange(qs, qs + m))
            blocks = np.arange(first // block, (first + m - 1) // block + 1, dtype=np.int64)
            cols.append((np.full(len(blocks), r, dtype=np.int64),
                         np.maximum(first, blocks * block),
                         np.minimum(first + m, (blocks + 1) * block),
                         np.maximum(0, blocks * block - window)))
        self.num_blocks = sum(len(c[0]) for c in cols)
        if not self.num_blocks:
            return
        row, lo, end, ws = (np.concatenate(x) for x in zip(*cols, strict=True))
        ncand = np.maximum(0, ws // block - 1)
        sparse = ncand > top_k  # else the block sees its whole causal prefix
        seqused = np.where(sparse, block + top_k * block + end - ws, end)
        # virtual block-table rows: a dense block lists pages [0, ceil(end / page)); a sparse
        # one key block 0's pages, top_k * bp slots the selection fills, then its window's
        end_pages = -(-end // page)
        lengths = np.where(sparse, bp + top_k * bp + end_pages - ws // page, end_pages)
        j = np.arange(lengths.max(), dtype=np.int64)[None, :]
        win = (ws // page)[:, None] + j - bp - top_k * bp
        table = np.where(sparse[:, None],
                         np.where(j < bp, j, np.where(j < bp + top_k * bp, 0, win)), j)
        table = torch.from_numpy(np.where(j < lengths[:, None], table, 0))
        lens = torch.from_numpy(end - lo)
        index = torch.cat(token_idx)
        # one prefill row (decode rows before it, its tail after it): its head-class tokens
        # are one contiguous range, so every layer reads and writes slices, not gathers
        first, last = int(index[0]), int(index[-1]) + 1
        self.token_range = (first, last) if last - first == len(index) else None
        self.token_index = index.to(device, non_blocking=True)
        self.token_block = torch.arange(self.num_blocks).repeat_interleave(lens).to(
            device, non_blocking=True)
        self.inv_block_len = (1.0 / lens.float())[:, None, None].to(device, non_blocking=True)
        self.cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(
            torch.int32).to(device, non_blocking=True)
        self.seqused_k = torch.from_numpy(seqused.astype(np.int32)).to(device, non_blocking=True)
        self.max_seqused = int(seqused.max())
        self.max_block_len = int(lens.max())
        self.bp, self.top_k, self.block = bp, top_k, block
        # the step's physical block tables (every layer of the KV-cache group shares the
        # block table): key block 0 and the windows filled in, selection slots to be filled
        block_row = torch.from_numpy(row).to(device, non_blocking=True)
        self.tables = md.block_table[block_row[:, None], table.to(device, non_blocking=True)
                                     ].to(torch.int32)
        self.page_offsets = torch.arange(bp, device=device)
        # per row with sparse blocks: its blocks, its key pages to score, and which key
        # blocks each of its query blocks may not select (block 0, its window, the future)
        self.sparse_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]] = []
        for r in np.unique(row[sparse]).tolist():
            ids = np.nonzero(sparse & (row == r))[0]
            nkb = int(ncand[ids].max()) + 1
            kb = np.arange(nkb)[None, :]
            excluded = torch.from_numpy((kb < 1) | (kb > ncand[ids][:, None]))
            bt = md.block_table[r]
            self.sparse_rows.append((torch.from_numpy(ids).to(device, non_blocking=True),
                                     bt[:nkb * bp].long(), bt.to(torch.int32),
                                     excluded.to(device, non_blocking=True)))


def _retrieval_group_cuda(fa: Any, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                          o: torch.Tensor, md: Any, g: HeadGroup, per: int,
                          common: dict[str, Any]) -> None:
    """A block-sparse retrieval group's prefill tokens (decode rows and tails are written
    by the full pass after it). The selection runs for all the group's KV heads at once, on
    the device and without a sync (block means, key-block extremes, :func:`block_scores`,
    top-k); then one FA3 varlen call per KV head (each head has its own block table) into
    one output buffer, scattered back once."""
    page = kc.shape[1]
    key = (g.block, g.window, g.topk, page)
    lay = md.retrieval_layouts.get(key)
    if lay is None:
        lay = md.retrieval_layouts[key] = RetrievalLayout(md, g.block, g.window, g.topk,
                                                          page, q.device)
    if not lay.num_blocks:
        return
    hg, d = kc.shape[2], q.shape[-1]
    # NOTE: this runs for every retrieval layer of a prefill step, eagerly; whatever does
    # not depend on the layer's K/Q lives in the layout (built once per step)
    if lay.token_range is not None:
        a, b = lay.token_range
        q_sub, res = q[a:b], o[a:b]  # views: FA reads and writes the batch in place
    else:
        q_sub = q[lay.token_index]  # [T', Hg * per, D]
        res = torch.empty_like(q_sub)
    tables = lay.tables.expand(hg, -1, -1).clone()  # [Hg, blocks, width]
    if lay.sparse_rows:
        # block means of the queries, over the block's tokens and each KV head's query heads
        qm = q_sub.view(-1, hg, per, d).float().mean(2)  # [T', Hg, D]
        qbar = torch.zeros(lay.num_blocks, hg, d, device=q.device, dtype=torch.float32)
        qbar.index_add_(0, lay.token_block, qm).mul_(lay.inv_block_len)
        for ids, pages, row_table, excluded in lay.sparse_rows:
            nkb = len(pages) // lay.bp
            # key-block extremes in the cache dtype (exact), scored in fp32
            kr = kc[pages].reshape(nkb, lay.block, hg, d)
            kmax, kmin = kr.amax(1).transpose(0, 1), kr.amin(1).transpose(0, 1)  # [Hg, nkb, D]
            score = block_scores(qbar[ids].transpose(0, 1), kmax, kmin)  # [Hg, n, nkb]
            sel = score.masked_fill_(excluded, float("-inf")).topk(lay.top_k, dim=-1).indices
            logical = (sel[..., None] * lay.bp + lay.page_offsets).reshape(hg, len(ids), -1)
            tables[:, ids, lay.bp:lay.bp + lay.top_k * lay.bp] = row_table[logical]
    for h in range(hg):
        fa(q=q_sub[:, h * per:(h + 1) * per], k=kc[:, :, h:h + 1], v=vc[:, :, h:h + 1],
           out=res[:, h * per:(h + 1) * per], cu_seqlens_q=lay.cu_seqlens_q,
           max_seqlen_q=lay.max_block_len, seqused_k=lay.seqused_k,
           max_seqlen_k=lay.max_seqused, block_table=tables[h], **common)
    if lay.token_range is None:
        o[lay.token_index] = res
