"""Head-class attention over the paged cache vs the naive masked-softmax reference."""

from __future__ import annotations

import pytest
import torch

from redknot_vllm.kernels.headclass_attention import (
    FULL,
    HeadGroup,
    headclass_attention_ref,
    paged_headclass_attention,
)
from redknot_vllm.kernels.paged_kv import write_kv

BLOCK = 16


def _groups(windows: list[int], sinks: list[int]) -> tuple[HeadGroup, ...]:
    buckets: dict[tuple[int, int], list[int]] = {}
    for h, (w, s) in enumerate(zip(windows, sinks, strict=True)):
        buckets.setdefault((w, s if w != FULL else 0), []).append(h)
    return tuple(HeadGroup(tuple(v), w, s) for (w, s), v in buckets.items())


def _run_chunks(q, k, v, chunks, groups, scale, num_blocks=96, seed=0):
    """Feed one sequence through the paged path in the given chunk sizes."""
    gen = torch.Generator().manual_seed(seed)
    n, hkv, d = k.shape
    cache = torch.randn(num_blocks, hkv, BLOCK, 2 * d, generator=gen)  # garbage elsewhere
    blocks = torch.randperm(num_blocks, generator=gen)[: -(-n // BLOCK)]
    out = torch.full_like(q, float("nan"))
    start = 0
    for c in chunks:
        end = start + c
        pos = torch.arange(start, end)
        slots = blocks[pos // BLOCK] * BLOCK + pos % BLOCK
        write_kv(cache, slots, k[start:end], v[start:end])
        paged_headclass_attention(q[start:end], cache, blocks[None], [0, c], [end], [True],
                                  groups, scale, out[start:end])
        start = end
    return out


CASES = [
    # (num_heads, num_kv_heads, seq_len, windows, sinks)
    (4, 4, 99, [FULL, 7, 33, FULL], [0, 4, 0, 0]),
    (8, 2, 423, [64, FULL], [4, 0]),
    (5, 1, 200, [19], [4]),
    (6, 3, 257, [1, 128, 300], [0, 16, 4]),  # W=1: self only (+ sinks)
    (6, 3, 150, [FULL, FULL, FULL], [0, 0, 0]),
    (9, 3, 311, [10, 10, FULL], [4, 30, 0]),  # sink larger than the window
]


@pytest.mark.parametrize("hq,hkv,n,windows,sinks", CASES)
def test_matches_reference_unchunked(hq, hkv, n, windows, sinks):
    torch.manual_seed(1)
    d = 32
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    scale = d**-0.5
    ref = headclass_attention_ref(q, k, v, torch.arange(n), torch.tensor(windows),
                                  torch.tensor(sinks), scale)
    out = _run_chunks(q, k, v, [n], _groups(windows, sinks), scale)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("hq,hkv,n,windows,sinks", CASES)
@pytest.mark.parametrize("chunk", [1, 37, 128])
def test_chunked_equals_unchunked(hq, hkv, n, windows, sinks, chunk):
    torch.manual_seed(2)
    d = 32
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    groups, scale = _groups(windows, sinks), d**-0.5
    chunks = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    whole = _run_chunks(q, k, v, [n], groups, scale)
    parts = _run_chunks(q, k, v, chunks, groups, scale)
    ref = headclass_attention_ref(q, k, v, torch.arange(n), torch.tensor(windows),
                                  torch.tensor(sinks), scale)
    assert (parts - whole).abs().max().item() < 1e-5
    assert (parts - ref).abs().max().item() < 1e-5


def test_mixed_batch_decode_rows_attend_fully():
    """A batch with a prefill row (local heads) and a decode row (full attention)."""
    torch.manual_seed(3)
    hq, hkv, d, nb = 4, 2, 16, 64
    windows, sinks = [8, FULL], [2, 0]
    groups = _groups(windows, sinks)
    cache = torch.randn(nb, hkv, BLOCK, 2 * d)
    # row 0: 40 cached tokens + 1 decode token; row 1: a 50-token prefill chunk after 30 cached
    lens, new = [41, 80], [1, 50]
    tables = torch.stack([torch.arange(0, 8), torch.arange(8, 16)])
    ks = [torch.randn(n, hkv, d) for n in lens]
    vs = [torch.randn(n, hkv, d) for n in lens]
    for r in range(2):
        pos = torch.arange(lens[r])
        write_kv(cache, tables[r][pos // BLOCK] * BLOCK + pos % BLOCK, ks[r], vs[r])
    q = torch.randn(sum(new), hq, d)
    out = torch.empty_like(q)
    paged_headclass_attention(q, cache, tables, [0, 1, 51], lens, [False, True], groups,
                              0.25, out)
    full = torch.tensor([FULL, FULL])
    ref0 = headclass_attention_ref(q[:1], ks[0], vs[0], torch.tensor([40]), full,
                                   torch.zeros(2, dtype=torch.long), 0.25)
    ref1 = headclass_attention_ref(q[1:], ks[1], vs[1], torch.arange(30, 80),
                                   torch.tensor(windows), torch.tensor(sinks), 0.25)
    assert (out[:1] - ref0).abs().max().item() < 1e-5
    assert (out[1:] - ref1).abs().max().item() < 1e-5


def test_write_kv_skips_padding_slots():
    cache = torch.zeros(4, 2, BLOCK, 8)
    k, v = torch.ones(3, 2, 4), 2 * torch.ones(3, 2, 4)
    write_kv(cache, torch.tensor([5, -1, 17]), k, v)
    assert cache[0, :, 5, :4].eq(1).all() and cache[0, :, 5, 4:].eq(2).all()
    assert cache[1, :, 1].eq(torch.tensor([1.0] * 4 + [2.0] * 4)).all()
    assert cache.ne(0).sum() == 2 * 2 * 8  # nothing else written


def test_full_tail_attends_fully_in_a_mixed_batch():
    """Prefill rows' last tokens attend fully on local heads too; decode rows fully."""
    torch.manual_seed(3)
    hq, hkv, d = 6, 3, 16
    groups = _groups([FULL, 20, 9], [0, 3, 2])
    rows = [(0, 70, True, 11), (40, 1, False, 0), (100, 33, True, 40), (5, 57, True, 0)]
    num_blocks = 64
    cache = torch.zeros(num_blocks, hkv, BLOCK, 2 * d)
    tables, ks, vs, qs, qsl, seq = [], [], [], [], [0], []
    for r, (ctx, n, _, _) in enumerate(rows):
        total = ctx + n
        nb = -(-total // BLOCK)
        tables.append(torch.arange(nb) + 16 * r)
        k, v = torch.randn(total, hkv, d), torch.randn(total, hkv, d)
        pos = torch.arange(total)
        write_kv(cache, tables[-1][pos // BLOCK] * BLOCK + pos % BLOCK, k, v)
        ks.append(k)
        vs.append(v)
        qs.append(torch.randn(n, hq, d))
        qsl.append(qsl[-1] + n)
        seq.append(total)
    table = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
    q = torch.cat(qs)
    out = torch.empty_like(q)
    paged_headclass_attention(q, cache, table, qsl, seq, [p for _, _, p, _ in rows], groups,
                              0.25, out, [t for *_, t in rows])
    window = torch.tensor([FULL, 20, 9])
    sink = torch.tensor([0, 3, 2])
    for r, (ctx, n, prefill, tail) in enumerate(rows):
        pos = torch.arange(ctx, ctx + n)
        ref = headclass_attention_ref(
            qs[r], ks[r], vs[r], pos, window if prefill else torch.full((3,), FULL), sink,
            0.25, full_from=ctx + n - tail if prefill and tail else None)
        torch.testing.assert_close(out[qsl[r]:qsl[r + 1]], ref, atol=1e-5, rtol=1e-5)
    # the tail changes what a far query sees: without it, row 2's last token differs
    alone = torch.empty_like(q)
    paged_headclass_attention(q, cache, table, qsl, seq, [p for _, _, p, _ in rows], groups,
                              0.25, alone)
    assert not torch.allclose(alone[qsl[3] - 1], out[qsl[3] - 1])


@pytest.mark.parametrize("rows", [
    [(40, 1, False), (300, 1, False), (0, 200, True), (100, 150, True)],  # mixed
    [(40, 1, False), (300, 1, False), (700, 1, False)],  # decode only
])
def test_segpaged_local_cuda_orchestration_matches_the_torch_path(rows, monkeypatch):
    """SegPaged's local layer on CUDA (``local_attention_cuda``: an FA3 window call per
    group, then the sink merge of every token) with FA3 and the Triton merge replaced by
    their torch references, on CPU: prefill and decode rows attend by head class, as the
    torch path's ``decode_groups`` does, and the pages between sinks and window, freed
    (the null block in the table), are never counted."""
    from redknot_vllm.attention.metadata import build_metadata
    from redknot_vllm.kernels import headclass_attention_cuda as cuda_mod
    from tests.kernels.fa_reference import fake_flash_attn_varlen

    def merge_ref(out, o_window, lse, q, kc, vc, table, row, pos, prefill, window, sink,
                  scale, all_tokens=False):
        out.copy_(cuda_mod.sink_merge_ref(o_window, lse, q, kc, vc, table, row, pos,
                                          prefill, window, sink, scale, out, all_tokens))

    monkeypatch.setattr(cuda_mod, "_fa", lambda: (fake_flash_attn_varlen, 3))
    monkeypatch.setattr(cuda_mod, "sink_merge", merge_ref)
    gen = torch.Generator().manual_seed(len(rows))
    hkv, per, d = 2, 2, 16
    groups = (HeadGroup((0,), 24, 4), HeadGroup((1,), 40, 16))
    num_blocks = 1 + sum(-(-(c + n) // BLOCK) for c, n, _ in rows)
    cache = torch.randn(num_blocks, hkv, BLOCK, 2 * d, generator=gen)
    cache[0] = 0  # vLLM's null block: zeros, never written
    perm = 1 + torch.randperm(num_blocks - 1, generator=gen)
    full, held, used, qsl, seq = [], [], 0, [0], []
    for c, n, _ in rows:
        nb = -(-(c + n) // BLOCK)
        t = perm[used:used + nb].clone()
        used += nb
        full.append(t.clone())
        # free what no query of this step sees: after the sink page, before the window
        t[1:max(1, (c - 40 + 1) // BLOCK)] = 0
        held.append(t)
        qsl.append(qsl[-1] + n)
        seq.append(c + n)
    pad = torch.nn.utils.rnn.pad_sequence
    table, table_full = pad(held, batch_first=True).int(), pad(full, batch_first=True).int()
    assert (table == 0).any() and not (table_full[:, 0] == 0).any()
    md = build_metadata(query_start_loc_cpu=qsl, seq_lens_cpu=seq,
                        is_prefill_cpu=[p for *_, p in rows], block_table=table,
                        slot_mapping=torch.zeros(qsl[-1]), device=torch.device("cpu"),
                        token_fields=True)
    q = torch.randn(qsl[-1], hkv * per, d, generator=gen) * 3
    out = torch.full_like(q, float("nan"))
    cuda_mod.local_attention_cuda(q, cache, md, groups, 0.25, out)
    ref = torch.zeros_like(q)
    paged_headclass_attention(q, cache, table_full, qsl, seq, md.is_prefill_cpu, groups, 0.25,
                              ref, decode_groups=groups)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    if all(n == 1 for _, n, _ in rows):
        # the builder's one-token-row form (captured decode graphs): token fields from a
        # fixed arange and vLLM's positions, no host plan; a padded row (the null block's
        # table, a stale position past the window) computes something that is dropped
        pad_table = torch.cat([table, torch.zeros(1, table.shape[1], dtype=table.dtype)])
        positions = torch.tensor([c for c, _, _ in rows] + [900])
        umd = build_metadata(query_start_loc_cpu=qsl + [qsl[-1] + 1], seq_lens_cpu=seq + [0],
                             is_prefill_cpu=[False] * (len(rows) + 1), block_table=pad_table,
                             slot_mapping=torch.zeros(qsl[-1] + 1), device=torch.device("cpu"))
        assert umd.token_row is None  # nothing planned on the host
        umd.token_row, umd.token_pos = torch.arange(len(rows) + 1), positions
        umd.token_is_prefill = torch.zeros(len(rows) + 1, dtype=torch.bool)
        uq = torch.cat([q, torch.randn(1, *q.shape[1:], generator=gen)])
        uout = torch.full_like(uq, float("nan"))
        cuda_mod.local_attention_cuda(uq, cache, umd, groups, 0.25, uout)
        torch.testing.assert_close(uout[:-1], ref, atol=1e-4, rtol=1e-4)
