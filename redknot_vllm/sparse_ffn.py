"""Sparse FFN in prefill: run the MLP only on the prompt tokens that matter.

Importance of a token is the L2 norm of its attention output before ``o_proj``, over all
query heads (the attention layer leaves the per-rank sum of squares in the runtime's step
state, :mod:`redknot_vllm.step`; it is all-reduced over tensor-parallel ranks here so every
rank picks the same tokens). Per sequence and per scheduled chunk, the kept set is:

* the highest-importance tokens whose cumulative share of the chunk's total importance
  stays strictly below the layer's threshold, always including the top token;
* plus the last ``recent_n`` tokens of the chunk (the whole prompt when it is not chunked);
* plus the top ``min_keep`` tokens when fewer than ``min_keep`` were kept;
* everything when the chunk's importance is all zero.

Unselected tokens get a zero FFN output (the residual passes through). Layers
``< dense_until`` and every decode token run dense.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.utils.torch_utils import direct_register_custom_op

from redknot_vllm import compat

if TYPE_CHECKING:
    from redknot_vllm.runtime import RedKnotRuntime

logger = init_logger(__name__)


def select_tokens(
    importance: torch.Tensor,
    token_row: torch.Tensor,
    num_rows: int,
    token_is_prefill: torch.Tensor,
    tokens_to_row_end: torch.Tensor,
    threshold: float,
    recent_n: int,
    min_keep: int,
    by_fraction: bool = False,
) -> torch.Tensor:
    """The tokens whose FFN runs, for a batch of rows (sequences) laid out contiguously.

    Args:
        importance: ``[T]`` non-negative token importance (fp32).
        token_row: ``[T]`` int64 row of each token; rows are contiguous and ascending.
        num_rows: number of rows.
        token_is_prefill: ``[T]`` bool; non-prefill (decode) tokens are always kept.
        tokens_to_row_end: ``[T]`` int64, 0 for the last token of its row.
        threshold: cumulative-mass threshold (or, with ``by_fraction``, the share of each
            row's tokens to keep by rank); ``>= 1`` keeps everything.
        recent_n: the last ``recent_n`` tokens of each row are kept.
        min_keep: rows keeping fewer tokens get their top ``min_keep``.

    Returns:
        ``[T]`` bool keep mask. No host synchronisation.
    """
    num_tokens = importance.shape[0]
    if threshold >= 1.0 or num_tokens == 0:
        return torch.ones(num_tokens, dtype=torch.bool, device=importance.device)
    imp = torch.where(token_is_prefill, importance.float(), 0.0).double()
    order = torch.sort(imp, descending=True, stable=True).indices
    order = order[torch.sort(token_row[order], stable=True).indices]
    s_imp, s_row = imp[order], token_row[order]

    counts = torch.zeros(num_rows, dtype=torch.long, device=imp.device).index_add_(
        0, token_row, torch.ones_like(token_row))
    starts = torch.cumsum(counts, 0) - counts
    row_total = torch.zeros(num_rows, dtype=imp.dtype, device=imp.device).index_add_(
        0, token_row, imp)
    csum = torch.cumsum(s_imp, 0)
    before = (csum - s_imp)[starts.clamp(max=max(num_tokens - 1, 0))]  # cumsum before each row
    seg_cum = csum - before[s_row]
    rank_sorted = torch.arange(num_tokens, device=imp.device) - starts[s_row]
    frac = seg_cum / row_total[s_row].clamp(min=torch.finfo(imp.dtype).tiny)
    if by_fraction:
        k_row = torch.ceil(counts.double() * threshold).long()
        keep_sorted = (rank_sorted < k_row[s_row]) | (rank_sorted == 0)
    else:
        keep_sorted = (frac < threshold) | (rank_sorted == 0)

    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    keep |= tokens_to_row_end < recent_n
    kept = torch.zeros(num_rows, dtype=torch.long, device=imp.device).index_add_(
        0, token_row, keep.long())
    keep |= (kept < min_keep)[token_row] & (rank < min_keep)
    keep |= (row_total == 0)[token_row]
    return keep | ~token_is_prefill


class SparseFFNMixin:
    """Turns a model's MLP module into a token-sparse one in place (see :func:`make_sparse`).

    The weights, parameter names and class hierarchy stay those of the original MLP; only
    ``forward`` goes through the ``redknot_sparse_mlp`` custom op, which is opaque to
    ``torch.compile``.
    """

    redknot_layer_name: str
    redknot_runtime: RedKnotRuntime
    redknot_layer: int
    redknot_threshold: float
    redknot_by_fraction: bool
    redknot_recent_n: int
    redknot_min_keep: int
    redknot_tp_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.vllm.redknot_sparse_mlp(x, self.redknot_layer_name)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)  # type: ignore[misc]


_SPARSE_CLASSES: dict[type, type] = {}


def make_sparse(
    mlp: torch.nn.Module,
    *,
    layer: int,
    prefix: str,
    runtime: RedKnotRuntime,
    threshold: float,
    recent_n: int,
    min_keep: int,
    tp_size: int,
    static_forward_context: dict[str, Any],
    by_fraction: bool = False,
) -> torch.nn.Module:
    """Make ``mlp`` token-sparse in place and register it for the custom op by ``prefix``."""
    base = type(mlp)
    if base not in _SPARSE_CLASSES:
        _SPARSE_CLASSES[base] = type(f"Sparse{base.__name__}", (SparseFFNMixin, base), {})
    mlp.__class__ = _SPARSE_CLASSES[base]
    mlp.redknot_layer_name = prefix
    mlp.redknot_runtime = runtime
    mlp.redknot_layer = layer
    mlp.redknot_threshold = threshold
    mlp.redknot_by_fraction = by_fraction
    mlp.redknot_recent_n = recent_n
    mlp.redknot_min_keep = min_keep
    mlp.redknot_tp_size = tp_size
    if prefix in static_forward_context:
        raise ValueError(f"Duplicate layer name: {prefix}")
    static_forward_context[prefix] = mlp
    return mlp


def _sparse_mlp(x: torch.Tensor, layer_name: str) -> torch.Tensor:
    mlp: Any = get_forward_context().no_compile_layers[layer_name]
    step = mlp.redknot_runtime.step
    if step is None or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Captured CUDA graphs replay this branch: small mixed batches run the FFN densely
        # (and are accounted as dense, since nothing is recorded).
        return mlp.dense_forward(x)
    sq = step.token_importance_sq.get(mlp.redknot_layer)
    if sq is None:
        logger.warning_once("RedKnot sparse FFN found no attention importance; running dense")
        return mlp.dense_forward(x)
    if mlp.redknot_tp_size > 1:
        from vllm.distributed import tensor_model_parallel_all_reduce

        sq = tensor_model_parallel_all_reduce(sq)
    md = step.attn
    n = md.num_actual_tokens
    keep = select_tokens(sq.sqrt(), md.token_row, md.num_reqs, md.token_is_prefill,
                         step.tokens_to_row_end(), mlp.redknot_threshold, mlp.redknot_recent_n,
                         mlp.redknot_min_keep, mlp.redknot_by_fraction)
    step.record_ffn_kept(mlp.redknot_layer, keep)
    if x.is_cuda and _sync_free_ok(mlp):
        from redknot_vllm.kernels.sparse_mlp import sparse_swiglu

        if x.shape[0] > n:
            keep = torch.cat([keep, keep.new_zeros(x.shape[0] - n)])
        reduce = None
        if mlp.redknot_tp_size > 1 and mlp.down_proj.reduce_results:
            from vllm.distributed import tensor_model_parallel_all_reduce as reduce
        return sparse_swiglu(x, keep, mlp.gate_up_proj.weight, mlp.down_proj.weight, reduce)
    # Host path (CPU, or layers the grouped GEMM cannot serve): one sync for the count.
    idx = keep.nonzero().squeeze(1)
    out = torch.zeros_like(x)
    out[idx] = mlp.dense_forward(x[:n][idx])
    return out


def _sync_free_ok(mlp: Any) -> bool:
    """Whether the MLP is a plain SwiGLU the grouped-GEMM path can run (cached per module)."""
    ok = getattr(mlp, "_redknot_sync_free", None)
    if ok is None:
        from vllm.model_executor.layers.activation import SiluAndMul

        layers = (getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None))
        ok = (hasattr(torch, "_grouped_mm")
              and isinstance(getattr(mlp, "act_fn", None), SiluAndMul)
              and all(lin is not None and compat.is_unquantized(lin)
                      and getattr(lin, "bias", None) is None
                      and lin.weight.dtype in (torch.bfloat16, torch.float16)
                      for lin in layers))
        if not ok:
            logger.warning_once(
                "RedKnot sparse FFN: %s is not a plain unquantized SwiGLU, so the kept tokens "
                "are gathered with a host sync", type(mlp).__name__)
        mlp._redknot_sync_free = ok
    return ok


def _sparse_mlp_fake(x: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(x)


direct_register_custom_op(
    op_name="redknot_sparse_mlp",
    op_func=_sparse_mlp,
    mutates_args=[],
    fake_impl=_sparse_mlp_fake,
)
