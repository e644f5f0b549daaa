"""Sparse SwiGLU MLP without host synchronisation (CUDA), and its torch reference.

The kept tokens are moved to the front (a stable sort of the keep mask), their count stays
on the device, and every stage only touches the first ``n`` rows:

    gather (Triton) -> gate_up GEMM (torch._grouped_mm, M bounded by offs=[n])
    -> SiLU·mul (Triton) -> down GEMM (grouped_mm) -> [TP all-reduce] -> scatter (Triton)

Rows past ``n`` of the intermediate buffers are never read back, so no ``.item()`` or
``nonzero()`` is needed and the shapes stay static.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from vllm.triton_utils import tl, triton


@triton.jit
def _move_rows_kernel(src_ptr, stride_s, idx_ptr, dst_ptr, stride_d, n_ptr, H,
                      SCATTER: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row r < n (n read on the device): gather dst[r] = src[idx[r]], or
    # (SCATTER) scatter dst[idx[r]] = src[r]. Rows r >= n exit at once.
    r = tl.program_id(0).to(tl.int64)
    if r >= tl.load(n_ptr):
        return
    i = tl.load(idx_ptr + r).to(tl.int64)
    if SCATTER:
        src_row = r
        dst_row = i
    else:
        src_row = i
        dst_row = r
    for c in range(0, H, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        m = cols < H
        tl.store(dst_ptr + dst_row * stride_d + cols,
                 tl.load(src_ptr + src_row * stride_s + cols, mask=m), mask=m)


@triton.jit
def _silu_mul_rows_kernel(gu_ptr, stride_g, y_ptr, stride_y, n_ptr, inter,
                          BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    if r >= tl.load(n_ptr):
        return
    for c in range(0, inter, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        m = cols < inter
        g = tl.load(gu_ptr + r * stride_g + cols, mask=m).to(tl.float32)
        u = tl.load(gu_ptr + r * stride_g + inter + cols, mask=m).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(y_ptr + r * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=m)


_BLOCK = 1024


def gather_rows(x: torch.Tensor, idx: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``y[i] = x[idx[i]]`` for ``i < n`` (``n`` a 1-element device tensor); other rows unset."""
    y = torch.empty_like(x)
    _move_rows_kernel[(x.shape[0],)](x, x.stride(0), idx, y, y.stride(0), n, x.shape[1],
                                     SCATTER=False, BLOCK=_BLOCK)
    return y


def scatter_rows(src: torch.Tensor, idx: torch.Tensor, n: torch.Tensor, out: torch.Tensor) -> None:
    """``out[idx[i]] = src[i]`` for ``i < n``."""
    _move_rows_kernel[(src.shape[0],)](src, src.stride(0), idx, out, out.stride(0), n,
                                       src.shape[1], SCATTER=True, BLOCK=_BLOCK)


def silu_mul_rows(gate_up: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation ``silu(g) * u`` of the first ``n`` rows of ``[g | u]``."""
    inter = gate_up.shape[1] // 2
    y = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_rows_kernel[(gate_up.shape[0],)](gate_up, gate_up.stride(0), y, y.stride(0), n,
                                               inter, BLOCK=_BLOCK)
    return y


def sparse_swiglu(x: torch.Tensor, keep: torch.Tensor, gate_up_weight: torch.Tensor,
                  down_weight: torch.Tensor,
                  all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """SwiGLU MLP on the kept rows of ``x``; zero for the others. No host sync.

    Args:
        x: ``[T, h]`` bf16/fp16 activations (CUDA).
        keep: ``[T]`` bool.
        gate_up_weight: ``[2I, h]`` (gate rows then up rows, as vLLM merges them).
        down_weight: ``[h, I]``.
        all_reduce: tensor-parallel reduction of the down projection, if sharded.

    Returns:
        ``[T, h]``.
    """
    order = torch.sort((~keep).to(torch.int8), stable=True).indices
    n = keep.sum(dtype=torch.int32).reshape(1)
    xs = gather_rows(x, order, n)
    gu = torch._grouped_mm(xs, gate_up_weight.t().unsqueeze(0), offs=n)
    down = torch._grouped_mm(silu_mul_rows(gu, n), down_weight.t().unsqueeze(0), offs=n)
    if all_reduce is not None:
        down = all_reduce(down)
    out = torch.zeros_like(x)
    scatter_rows(down, order, n, out)
    return out


def sparse_swiglu_ref(x: torch.Tensor, keep: torch.Tensor, gate_up_weight: torch.Tensor,
                      down_weight: torch.Tensor) -> torch.Tensor:
    """Reference: the dense SwiGLU in fp32, zeroed where ``keep`` is False."""
    gu = x.float() @ gate_up_weight.float().t()
    g, u = gu.chunk(2, dim=-1)
    y = (F.silu(g) * u) @ down_weight.float().t()
    return torch.where(keep[:, None], y, 0.0)
