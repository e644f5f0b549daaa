"""Block-sparse retrieval heads: the tiled torch path vs the position-by-position reference,
and their FLOPs formula vs the keys the reference lets each query see."""

from __future__ import annotations

import pytest
import torch

from redknot_vllm.dims import ModelDims
from redknot_vllm.flops import AttentionShape, sum_positions
from redknot_vllm.head_config import RetrievalBlocks
from redknot_vllm.kernels.headclass_attention import (
    FULL,
    HeadGroup,
    _retrieval_mask_ref,
    headclass_attention_ref,
    paged_headclass_attention,
)
from redknot_vllm.kernels.paged_kv import write_kv
from tests.kernels.fa_reference import fake_flash_attn_varlen

PAGE = 16


def _paged(k, v, num_blocks=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, hkv, d = k.shape
    cache = torch.randn(num_blocks, hkv, PAGE, 2 * d, generator=gen)
    table = torch.randperm(num_blocks, generator=gen)[: -(-n // PAGE)]
    pos = torch.arange(n)
    write_kv(cache, table[pos // PAGE] * PAGE + pos % PAGE, k, v)
    return cache, table


@pytest.mark.parametrize("n,chunks,topk,block,window,tail", [
    (700, [700], 3, 16, 64, 0),
    (700, [300, 400], 3, 16, 64, 0),  # chunked: the second chunk starts mid-block
    (640, [640], 2, 32, 64, 50),  # the question attends fully
    (200, [200], 50, 16, 32, 0),  # more blocks kept than exist: the whole prefix
])
def test_retrieval_group_matches_reference(n, chunks, topk, block, window, tail):
    torch.manual_seed(n + topk)
    hq, hkv, d = 6, 3, 16
    k, v = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    # sharp queries, so that the top blocks differ between heads and blocks
    q = torch.randn(n, hq, d) * 3
    groups = (HeadGroup((0,), FULL, 0), HeadGroup((1, 2), window, 0, topk=topk, block=block))
    cache, table = _paged(k, v)
    out = torch.full_like(q, float("nan"))
    start = 0
    for c in chunks:
        end = start + c
        paged_headclass_attention(q[start:end], cache, table[None], [0, c], [end], [True],
                                  groups, 0.25, out[start:end], [tail])
        start = end
    assert not out.isnan().any()
    start = 0
    for c in chunks:  # each chunk's block means are over that chunk's queries
        end = start + c
        ref = headclass_attention_ref(
            q[start:end], k[:end], v[:end], torch.arange(start, end),
            torch.tensor([FULL, FULL, FULL]), torch.zeros(3, dtype=torch.long), 0.25,
            full_from=end - tail if tail else None,
            retrieval={1: (topk, block, window), 2: (topk, block, window)})
        torch.testing.assert_close(out[start:end], ref, atol=1e-5, rtol=1e-5)
        start = end


def test_retrieval_sees_less_than_full_and_differs_per_head():
    torch.manual_seed(0)
    n, d = 800, 16
    q, k = torch.randn(n, 4, d) * 3, torch.randn(n, 2, d)
    pos = torch.arange(n)
    masks = [_retrieval_mask_ref(q, k, pos, h, 2, 4, 16, 64, None) for h in (0, 1)]
    full = (pos[None, :] <= pos[:, None]).sum()
    for m in masks:
        assert (m & ~(pos[None, :] <= pos[:, None])).sum() == 0  # causal
        assert m.sum() < full // 2  # at most 16 + 4·16 + 64 + 16 keys of up to 800
        assert m[:, :16][16 * 6:].all()  # key block 0 always, once the blocks thin out
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("start,end,tail", [(0, 700, 0), (300, 700, 0), (0, 640, 50),
                                            (0, 100, 0)])
def test_retrieval_flops_count_the_reference_keys(start, end, tail):
    rb = RetrievalBlocks(top_k=3, block=16, window=64)
    dims = ModelDims(num_layers=1, hidden=32, intermediate=64, num_q_heads=2, num_kv_heads=1,
                     head_dim=16, max_positions=4096)
    shape = AttentionShape((0,), ((),), (1,), rb)
    torch.manual_seed(1)
    q, k = torch.randn(end, 2, 16), torch.randn(end, 1, 16)
    split = end - tail
    pos = torch.arange(start, split)
    seen = _retrieval_mask_ref(q[start:split], k[:split], pos, 0, 2, 3, 16, 64, None).sum()
    keys, scored = shape.retrieval_keys(start, split)
    assert keys == int(seen)
    expected = 4 * 16 * (2 * (keys + sum_positions(split, end)) + scored)
    assert shape.attention_flops(dims, start, end, tail) == expected
    assert scored == sum(max(0, (b * 16 - 64) // 16 - 1) for b in range(start // 16,
                                                                          -(-split // 16))
                         if max(0, (b * 16 - 64) // 16 - 1) > 3)


@pytest.mark.parametrize("rows,tail", [
    ([(0, 700, True)], 0),  # one prefill row: slices, no gather
    ([(40, 1, False), (0, 900, True)], 48),  # one row after a decode, with a tail: slices
    ([(40, 1, False), (300, 400, True), (0, 500, True)], 48),  # decode first, chunked row
    ([(0, 300, True), (90, 1, False), (650, 1, True)], 0),  # interleaved, one-token chunk
])
def test_cuda_retrieval_orchestration_matches_the_torch_path(rows, tail, monkeypatch):
    """The CUDA path of a retrieval group with FA3 replaced by a torch equivalent, on CPU:
    its query-block layout, virtual block tables and device-side top-k give what the tested
    torch implementation gives (the FA3 call itself is checked on the GPU)."""
    from redknot_vllm.attention.metadata import build_metadata
    from redknot_vllm.kernels import headclass_attention_cuda as cuda_mod

    monkeypatch.setattr(cuda_mod, "_fa", lambda: (fake_flash_attn_varlen, 3))
    torch.manual_seed(len(rows) + tail)
    hq, hkv, d = 6, 3, 16
    groups = (HeadGroup((0,), FULL, 0), HeadGroup((1, 2), 64, 0, topk=3, block=16))
    num_blocks = 160
    cache = torch.randn(num_blocks, hkv, PAGE, 2 * d)
    perm = torch.randperm(num_blocks)
    tables, used, qsl, seq = [], 0, [0], []
    for c, n, _ in rows:
        nb = -(-(c + n) // PAGE)
        tables.append(perm[used:used + nb])
        used += nb
        qsl.append(qsl[-1] + n)
        seq.append(c + n)
    table = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True).int()
    md = build_metadata(query_start_loc_cpu=qsl, seq_lens_cpu=seq,
                        is_prefill_cpu=[p for *_, p in rows], block_table=table,
                        slot_mapping=torch.zeros(qsl[-1]), device=torch.device("cpu"),
                        full_tail_cpu=[tail] * len(rows) if tail else None)
    q = torch.randn(qsl[-1], hq, d) * 3
    out = torch.full_like(q, float("nan"))
    cuda_mod.paged_headclass_attention_cuda(q, cache, md, groups, 0.25, out)
    ref = torch.zeros_like(q)
    paged_headclass_attention(q, cache, table, qsl, seq, md.is_prefill_cpu, groups, 0.25, ref,
                              md.full_tail_cpu)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # one prefill row's head-class tokens are one range: read and written as slices
    lay = next(iter(md.retrieval_layouts.values()))
    assert (lay.token_range is not None) == (sum(p for *_, p in rows) == 1)
