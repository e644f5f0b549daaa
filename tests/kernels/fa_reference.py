"""FA3's paged varlen call in torch, so that the CUDA attention paths' orchestration
(virtual block tables, device-side selection, window plus sink merge) runs on the CPU; the
FA3 calls themselves are checked on the GPU (``test_cuda_kernels.py``)."""

from __future__ import annotations

import torch


def fake_flash_attn_varlen(q, k, v, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                           block_table, softmax_scale, causal, fa_version, out=None,
                           window_size=None, return_softmax_lse=False, **unsupported):
    """Causal, bottom-right aligned, GQA; ``window_size=[left, 0]``: a query at ``p`` sees
    keys ``[p - left, p]``. Returns ``out`` (or a new tensor), with the fp32 LSE ``[H, T]``
    when asked, as vLLM's ``flash_attn_varlen_func`` does."""
    assert causal and not unsupported, unsupported
    assert window_size is None or window_size[1] == 0, window_size
    page, hkv = k.shape[1], k.shape[2]
    res = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for i in range(len(seqused_k)):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        if a == b:
            continue
        n = int(seqused_k[i])
        pages = block_table[i, : -(-n // page)].long()
        ks = k[pages].reshape(-1, hkv, k.shape[-1])[:n].transpose(0, 1).float()
        vs = v[pages].reshape(-1, hkv, v.shape[-1])[:n].transpose(0, 1).float()
        per = q.shape[1] // hkv
        ks, vs = ks.repeat_interleave(per, 0), vs.repeat_interleave(per, 0)
        kpos, qpos = torch.arange(n), torch.arange(n - (b - a), n)
        mask = kpos[None] <= qpos[:, None]
        if window_size is not None:
            mask &= kpos[None] >= qpos[:, None] - window_size[0]
        s = torch.einsum("htd,hsd->hts", q[a:b].transpose(0, 1).float(), ks) * softmax_scale
        s = s.masked_fill(~mask, float("-inf"))
        lse[:, a:b] = torch.logsumexp(s, dim=-1)
        res[a:b] = torch.einsum("hts,hsd->htd", s.softmax(-1), vs).transpose(0, 1).to(q.dtype)
    if out is not None:
        out.copy_(res)
        res = out
    return (res, lse) if return_softmax_lse else res
