"""The CUDA head-class path's host and selection logic on the CPU: FA3 replaced by a torch
paged varlen attention, so the retrieval layout (virtual block tables, the one-row slice
path, the on-device selection) is checked against the torch implementation in CI, not only
on a GPU (the kernels themselves are tested in ``test_cuda_kernels.py``)."""

from __future__ import annotations

import pytest
import torch

from redknot_vllm.attention.metadata import build_metadata
from redknot_vllm.kernels import headclass_attention_cuda as cuda_path
from redknot_vllm.kernels.headclass_attention import FULL, HeadGroup, paged_headclass_attention

PAGE = 16


def fa_varlen_ref(*, q, k, v, cu_seqlens_q, seqused_k, block_table, softmax_scale, causal,
                  out=None, window_size=None, return_softmax_lse=False, **_):
    """Torch stand-in for vLLM's ``flash_attn_varlen_func`` over a paged cache (causal,
    bottom-right aligned, full window): q ``[T, H, D]``, k/v ``[blocks, page, Hkv, D]``."""
    assert causal and window_size is None and not return_softmax_lse
    res = torch.empty_like(q) if out is None else out
    per = q.shape[1] // k.shape[2]
    page = k.shape[1]
    for i in range(len(seqused_k)):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        n, s = b - a, int(seqused_k[i])
        pages = block_table[i, :-(-s // page)].long()
        kk = k[pages].reshape(-1, k.shape[2], k.shape[3])[:s].float()
        vv = v[pages].reshape(-1, v.shape[2], v.shape[3])[:s].float()
        kk, vv = kk.repeat_interleave(per, 1), vv.repeat_interleave(per, 1)
        sc = torch.einsum("thd,shd->hts", q[a:b].float(), kk) * softmax_scale
        allowed = torch.arange(s)[None, :] <= (s - n + torch.arange(n))[:, None]
        sc = sc.masked_fill(~allowed, float("-inf"))
        res[a:b] = torch.einsum("hts,shd->thd", sc.softmax(-1), vv).to(res.dtype)
    return None if out is not None else res


def _batch(rows, hkv, d, tail, seed):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // PAGE) for c, n, _ in rows) + 8
    cache = torch.randn(num_blocks, hkv, PAGE, 2 * d, generator=g).to(torch.bfloat16)
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(rows), max(-(-(c + n) // PAGE) for c, n, _ in rows),
                        dtype=torch.int32)
    used = 0
    for r, (c, n, _) in enumerate(rows):
        nb = -(-(c + n) // PAGE)
        table[r, :nb] = perm[used:used + nb].int()
        used += nb
    qsl = [0]
    for _, n, _ in rows:
        qsl.append(qsl[-1] + n)
    md = build_metadata(
        query_start_loc_cpu=qsl, seq_lens_cpu=[c + n for c, n, _ in rows],
        is_prefill_cpu=[p for _, _, p in rows], block_table=table,
        slot_mapping=torch.zeros(qsl[-1]), device=torch.device("cpu"),
        full_tail_cpu=[tail] * len(rows) if tail else None)
    return cache, md


@pytest.mark.parametrize("rows,tail", [
    ([(0, 1200, True)], 0),  # one row: the slice path
    ([(40, 1, False), (0, 1500, True)], 48),  # decode first, one row with a tail: slices
    ([(40, 1, False), (500, 700, True), (0, 900, True)], 48),  # two rows: the gather path
    ([(0, 300, True), (90, 1, False), (700, 1, True)], 0),  # interleaved, one-token chunk
])
def test_cuda_retrieval_logic_matches_the_torch_path(monkeypatch, rows, tail):
    monkeypatch.setattr(cuda_path, "_fa", lambda: (fa_varlen_ref, 3))
    d, hkv, per = 32, 3, 2
    groups = (HeadGroup((0,), FULL, 0), HeadGroup((1, 2), 128, 0, topk=3, block=32))
    cache, md = _batch(rows, hkv, d, tail, seed=7)
    g = torch.Generator().manual_seed(8)
    q = (torch.randn(md.num_actual_tokens, hkv * per, d, generator=g) * 3).to(torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    cuda_path.paged_headclass_attention_cuda(q, cache, md, groups, d**-0.5, out)
    ref = torch.zeros_like(q)
    paged_headclass_attention(q, cache, md.block_table, md.query_start_loc_cpu,
                              md.seq_lens_cpu, md.is_prefill_cpu, groups, d**-0.5, ref,
                              md.full_tail_cpu)
    assert not out.isnan().any()
    err = (out.float() - ref.float()).norm(dim=(1, 2)) / ref.float().norm(dim=(1, 2))
    assert err.max() < 2e-2, (err.argmax().item(), err.max().item())
    lay = next(iter(md.retrieval_layouts.values()))
    assert (lay.token_range is not None) == (sum(p for _, _, p in rows) == 1)
