"""CUDA kernels against their torch references (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from redknot_vllm.attention.metadata import build_metadata
from redknot_vllm.kernels.headclass_attention import FULL, HeadGroup, headclass_attention_ref

pytestmark = pytest.mark.gpu
DEV = "cuda"
PAGE = 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _batch(rows, hkv, d, num_blocks=512, seed=0, tail=0, token_fields=False):
    """rows: list of (context_len_before, new_tokens, is_prefill). Returns cache + metadata;
    ``tail``: each prefill row's last tokens attend fully."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cache = torch.randn(num_blocks, hkv, PAGE, 2 * d, device=DEV, dtype=torch.bfloat16,
                        generator=g)
    perm = torch.randperm(num_blocks, device=DEV, generator=g)
    max_blocks = max(-(-(c + n) // PAGE) for c, n, _ in rows)
    table = torch.zeros(len(rows), max_blocks, dtype=torch.int32, device=DEV)
    used = 0
    for r, (c, n, _) in enumerate(rows):
        nb = -(-(c + n) // PAGE)
        table[r, :nb] = perm[used:used + nb].int()
        used += nb
    q_lens = [n for _, n, _ in rows]
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    seq = [c + n for c, n, _ in rows]
    md = build_metadata(
        query_start_loc_cpu=qsl, seq_lens_cpu=seq, is_prefill_cpu=[p for _, _, p in rows],
        block_table=table, slot_mapping=torch.zeros(qsl[-1], device=DEV),
        device=torch.device(DEV), full_tail_cpu=[tail] * len(rows) if tail else None,
        token_fields=token_fields)
    assert md.max_query_len == max(q_lens) and md.max_seq_len == max(seq)
    return cache, md


def _sharp_run(rows, hkv, per, d, groups, tail, num_blocks, seed):
    """A batch, sharp (scaled) bf16 queries and the CUDA head-class attention's output."""
    from redknot_vllm.kernels.headclass_attention_cuda import paged_headclass_attention_cuda

    cache, md = _batch(rows, hkv, d, num_blocks=num_blocks, seed=seed, tail=tail)
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    q = (torch.randn(md.num_actual_tokens, hkv * per, d, device=DEV, generator=g) * 3).to(
        torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    paged_headclass_attention_cuda(q, cache, md, groups, d**-0.5, out)
    assert not out.isnan().any()
    return cache, md, q, out


def _assert_tokens_close(got, ref, where=None, tol=3e-2):
    """Relative error of every token's output, each on its own (a wrong window or sink
    shows in single tokens, not in a norm over thousands)."""
    per_token = (got - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))
    assert per_token.max() < tol, (where, per_token.argmax().item(), per_token.max().item())


def _seq_kv(cache, table_row, seq_len, d):
    blocks = table_row[: -(-seq_len // PAGE)].long()
    kv = cache[blocks].transpose(0, 1).reshape(cache.shape[1], -1, 2 * d)[:, :seq_len]
    return kv[..., :d].transpose(0, 1), kv[..., d:].transpose(0, 1)  # [S, H, D]


@pytest.mark.parametrize("rows", [
    [(0, 700, True)],
    [(300, 257, True), (0, 64, True)],
    [(40, 1, False), (77, 1, False), (0, 500, True), (1000, 333, True)],  # decodes lead
    [(0, 200, True), (90, 1, False), (5, 1, True), (400, 1, False)],  # interleaved
])
@pytest.mark.parametrize("hkv,per,groups", [
    (4, 2, (HeadGroup((0,), FULL, 0), HeadGroup((1, 2, 3), 64, 4))),
    (8, 4, (HeadGroup((0,), FULL, 0), HeadGroup((1, 2, 3, 4, 5, 6, 7), 128, 16))),
    (2, 1, (HeadGroup((0, 1), 33, 0),)),
])
@pytest.mark.parametrize("tail", [0, 48])
def test_paged_headclass_attention_cuda_matches_reference(rows, hkv, per, groups, tail):
    from redknot_vllm.kernels.headclass_attention_cuda import paged_headclass_attention_cuda

    d = 128
    cache, md = _batch(rows, hkv, d, tail=tail)
    q = torch.randn(md.num_actual_tokens, hkv * per, d, device=DEV, dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    paged_headclass_attention_cuda(q, cache, md, groups, d**-0.5, out)
    assert not out.isnan().any()
    win = torch.full((hkv,), FULL)
    sink = torch.zeros(hkv, dtype=torch.long)
    for g in groups:
        for h in g.kv_heads:
            win[h], sink[h] = g.window, g.sink
    for r, (c, n, prefill) in enumerate(rows):
        k, v = _seq_kv(cache, md.block_table[r], c + n, d)
        a, b = md.query_start_loc_cpu[r], md.query_start_loc_cpu[r + 1]
        w = win if prefill else torch.full((hkv,), FULL)
        ref = headclass_attention_ref(q[a:b].cpu(), k.cpu(), v.cpu(), torch.arange(c, c + n),
                                      w, sink, d**-0.5,
                                      full_from=c + n - tail if tail and prefill else None)
        assert _rel(out[a:b].cpu(), ref) < 2e-2, (r, _rel(out[a:b].cpu(), ref))


def test_sink_merge_matches_reference():
    from redknot_vllm.kernels.headclass_attention_cuda import sink_merge, sink_merge_ref

    d, hkv, per = 64, 3, 3
    cache, md = _batch([(0, 300, True), (20, 1, False), (500, 90, True)], hkv, d, seed=1)
    key_cache, value_cache = cache.transpose(1, 2).split(d, dim=-1)
    t, hq = md.num_actual_tokens, hkv * per
    q = torch.randn(t, hq, d, device=DEV, dtype=torch.bfloat16)
    o_w = torch.randn(t, hq, d, device=DEV, dtype=torch.bfloat16)
    lse = torch.randn(hq, t, device=DEV) * 3
    out = torch.zeros(t, 2 * hq, d, device=DEV, dtype=torch.bfloat16)[:, hq:]  # strided view
    args = (q, key_cache, value_cache, md.block_table, md.token_row, md.token_pos,
            md.token_is_prefill, 40, 7, d**-0.5)
    sink_merge(out, o_w, lse, *args)
    ref = sink_merge_ref(o_w, lse, *args, out=torch.zeros_like(out))
    assert _rel(out, ref) < 1e-2
    assert out[300].abs().sum() == 0  # the decode token is untouched
    assert out[:40].abs().sum() == 0  # p < W: the window saw every sink, nothing to merge
    inplace = o_w.clone()  # the production call merges into the window output itself
    sink_merge(inplace, inplace, lse, *args)
    assert _rel(inplace, sink_merge_ref(o_w, lse, *args, out=o_w.clone())) < 1e-2


def test_sink_merge_of_every_token_matches_reference():
    """``all_tokens`` (SegPaged's local layer): decode tokens past the window merge too."""
    from redknot_vllm.kernels.headclass_attention_cuda import sink_merge, sink_merge_ref

    d, hkv, per = 64, 2, 7
    cache, md = _batch([(300, 1, False), (0, 200, True), (90, 1, False)], hkv, d, seed=2,
                       token_fields=True)
    key_cache, value_cache = cache.transpose(1, 2).split(d, dim=-1)
    t, hq = md.num_actual_tokens, hkv * per
    q = torch.randn(t, hq, d, device=DEV, dtype=torch.bfloat16)
    o_w = torch.randn(t, hq, d, device=DEV, dtype=torch.bfloat16)
    lse = torch.randn(hq, t, device=DEV) * 3
    args = (q, key_cache, value_cache, md.block_table, md.token_row, md.token_pos,
            md.token_is_prefill, 40, 4, d**-0.5)
    out = torch.zeros_like(o_w)
    sink_merge(out, o_w, lse, *args, all_tokens=True)
    ref = sink_merge_ref(o_w, lse, *args, out=torch.zeros_like(o_w), all_tokens=True)
    assert _rel(out, ref) < 1e-2
    assert out[0].abs().sum() > 0 and out[-1].abs().sum() > 0  # both decode tokens merged


@pytest.mark.parametrize("t,h,inter,frac", [(1000, 256, 512, 0.15), (4099, 576, 1536, 0.5),
                                            (17, 64, 128, 0.0), (33, 64, 128, 1.0)])
def test_sparse_swiglu_matches_reference(t, h, inter, frac):
    from redknot_vllm.kernels.sparse_mlp import sparse_swiglu, sparse_swiglu_ref

    g = torch.Generator(device=DEV).manual_seed(t)
    x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16, generator=g)
    wgu = torch.randn(2 * inter, h, device=DEV, dtype=torch.bfloat16, generator=g) / h**0.5
    wd = torch.randn(h, inter, device=DEV, dtype=torch.bfloat16, generator=g) / inter**0.5
    keep = torch.rand(t, device=DEV, generator=g) < frac
    out = sparse_swiglu(x, keep, wgu, wd)
    ref = sparse_swiglu_ref(x, keep, wgu, wd)
    assert (out[~keep] == 0).all()
    if keep.any():
        assert _rel(out[keep], ref[keep]) < 2e-2


def test_warm_up_compiles_the_sink_merge_kernel():
    from redknot_vllm.kernels.headclass_attention_cuda import warm_up_sink_merge

    warm_up_sink_merge(7, 64, PAGE, {(2048, 4), (1024, 16)}, torch.bfloat16, torch.device(DEV))
    torch.cuda.synchronize()


@pytest.mark.parametrize("rows", [[(0, 8192, True)], [(0, 4000, True), (3000, 4100, True)]])
def test_headclass_attention_cuda_at_qwen05_scale(rows):
    """The shipped Qwen2.5-Coder-0.5B layout at the lengths where its quality is measured:
    GQA 7 (14 query, 2 KV heads), head size 64, one global and one local KV head (W=1024,
    sink 4), the last 128 tokens full. Sharp (scaled) queries, so that a window or sink off
    by a few keys shows in single tokens, checked one token at a time."""

    d, hkv, per, tail = 64, 2, 7, 128
    groups = (HeadGroup((0,), FULL, 0), HeadGroup((1,), 1024, 4))
    cache, md, q, out = _sharp_run(rows, hkv, per, d, groups, tail, num_blocks=1024, seed=3)
    win, sink = torch.tensor([FULL, 1024]), torch.tensor([0, 4])
    for r, (c, n, _) in enumerate(rows):
        k, v = _seq_kv(cache, md.block_table[r], c + n, d)
        a, b = md.query_start_loc_cpu[r], md.query_start_loc_cpu[r + 1]
        ref = headclass_attention_ref(q[a:b].cpu(), k.cpu(), v.cpu(), torch.arange(c, c + n),
                                      win, sink, d**-0.5, full_from=c + n - tail)
        _assert_tokens_close(out[a:b].cpu().float(), ref, r)


@pytest.mark.parametrize("rows,tail", [
    ([(0, 1200, True)], 0),
    ([(40, 1, False), (0, 1500, True)], 48),  # one prefill row after a decode: slices
    ([(40, 1, False), (500, 700, True), (0, 900, True)], 48),  # decode first, chunked row
    ([(0, 300, True), (90, 1, False), (700, 1, True)], 0),  # interleaved, one-token chunk
])
def test_retrieval_group_cuda_matches_the_torch_path(rows, tail):
    """Block-sparse retrieval heads on CUDA (virtual block tables, selection on the device)
    against the tested torch implementation on the same GPU tensors."""
    from redknot_vllm.kernels.headclass_attention import paged_headclass_attention

    d, hkv, per = 64, 3, 2
    groups = (HeadGroup((0,), FULL, 0), HeadGroup((1, 2), 128, 0, topk=3, block=32))
    cache, md, q, out = _sharp_run(rows, hkv, per, d, groups, tail, num_blocks=512, seed=5)
    ref = torch.zeros_like(q)
    paged_headclass_attention(q, cache, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu,
                              md.is_prefill_cpu, groups, d**-0.5, ref, md.full_tail_cpu)
    _assert_tokens_close(out.float(), ref.float())
