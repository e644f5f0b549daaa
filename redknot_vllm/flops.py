"""Analytic prefill FLOPs, dense vs RedKnot, by the formula of ``docs/evaluation.md``.

Per layer, for the ``T`` prompt tokens actually computed (prefix-cache hits are free)::

    projections  2·T·h·(Hq + 2·Hkv)·D + 2·T·Hq·D·h
    attention    4·D·Σ_t visible_keys(t)   per query head
                 global head: t + 1 keys;  local head: min(t + 1, sink + W) keys
                 block-sparse retrieval head (K blocks of R, window W), t in block b,
                 ws = max(0, b·R - W): t + 1 keys while b has <= K candidate blocks,
                 else R + K·R + (t - ws + 1) keys, plus 4·D per candidate block and
                 query block for the selection (per KV head: its score)
    FFN          6·h·I per token that runs it (SwiGLU)

FLOPs saved = 1 − RedKnot / dense, with the kept FFN token counts measured on the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from redknot_vllm.dims import ModelDims
from redknot_vllm.head_config import HeadClass, HeadConfig, RetrievalBlocks


def sum_positions(start: int, end: int) -> int:
    """Σ_{t=start}^{end-1} (t + 1): keys seen by full causal heads for positions [start, end)."""
    return (end * (end + 1) - start * (start + 1)) // 2


def sum_capped(start: int, end: int, cap: int) -> int:
    """Σ_{t=start}^{end-1} min(t + 1, cap)."""
    split = min(max(cap - 1, start), end)  # positions < split see t + 1 < cap keys
    return sum_positions(start, split) + cap * (end - split)


@dataclass(frozen=True)
class AttentionShape:
    """Per layer: query heads per visibility rule, for FLOPs."""

    full_q_heads: tuple[int, ...]
    """[num_layers] query heads attending the full prefix."""
    local_q_heads: tuple[tuple[tuple[int, int], ...], ...]
    """[num_layers] of ((sink + W), query heads) for local heads."""
    retrieval_kv_heads: tuple[int, ...] = ()
    """[num_layers] block-sparse retrieval KV heads (empty: none)."""
    retrieval: RetrievalBlocks | None = None

    @classmethod
    def dense(cls, dims: ModelDims) -> AttentionShape:
        return cls((dims.num_q_heads,) * dims.num_layers, ((),) * dims.num_layers)

    @classmethod
    def from_head_config(cls, dims: ModelDims, hc: HeadConfig) -> AttentionShape:
        per_kv = dims.num_q_heads // dims.num_kv_heads
        full, local, retr = [], [], []
        for li in range(dims.num_layers):
            f = r = 0
            caps: dict[int, int] = {}
            for h in range(dims.num_kv_heads):
                cls_ = hc.effective_class(li, h)
                if cls_ is HeadClass.LOCAL:
                    cap = hc.windows[li][h] + hc.sinks[li][h]
                    caps[cap] = caps.get(cap, 0) + per_kv
                elif cls_ is HeadClass.RETRIEVAL and hc.retrieval_blocks is not None:
                    r += 1
                else:
                    f += per_kv
            full.append(f)
            local.append(tuple(sorted(caps.items())))
            retr.append(r)
        if not any(retr):
            return cls(tuple(full), tuple(local))
        return cls(tuple(full), tuple(local), tuple(retr), hc.retrieval_blocks)

    def retrieval_keys(self, start: int, end: int) -> tuple[int, int]:
        """(Σ visible keys per query head, Σ candidate blocks scored per query block) of
        one block-sparse retrieval head over positions [start, end)."""
        rb = self.retrieval
        assert rb is not None
        keys = scored = 0
        r = rb.block
        for b in range(start // r, (end - 1) // r + 1 if end > start else start // r):
            lo, hi = max(start, b * r), min(end, (b + 1) * r)
            ws = max(0, b * r - rb.window)
            ncand = max(0, ws // r - 1)
            if ncand <= rb.top_k:
                keys += sum_positions(lo, hi)
            else:
                keys += (hi - lo) * (r + rb.top_k * r) + sum_positions(lo - ws, hi - ws)
                scored += ncand
        return keys, scored

    def attention_flops(self, dims: ModelDims, start: int, end: int, tail: int = 0) -> int:
        """Attention FLOPs of computing positions [start, end) in every layer; the last
        ``tail`` of them attend fully on every head (``tail_full_tokens``)."""
        total = 0
        full_keys = sum_positions(start, end)
        split = max(start, end - tail)
        per_kv = dims.num_q_heads // dims.num_kv_heads
        rk, scored = self.retrieval_keys(start, split) if self.retrieval_kv_heads else (0, 0)
        for li in range(dims.num_layers):
            keys = self.full_q_heads[li] * full_keys
            for cap, heads in self.local_q_heads[li]:
                keys += heads * (sum_capped(start, split, cap) + sum_positions(split, end))
            if self.retrieval_kv_heads and self.retrieval_kv_heads[li]:
                n = self.retrieval_kv_heads[li]
                keys += n * per_kv * (rk + sum_positions(split, end)) + n * scored
            total += 4 * dims.head_dim * keys
        return total


@dataclass
class PrefillFlops:
    """FLOPs of one request's prefill, dense and RedKnot."""

    tokens: int = 0
    """Prompt tokens computed (excluding prefix-cache hits)."""
    dense: int = 0
    redknot: int = 0
    ffn_tokens_dense: int = 0
    """Σ over layers of tokens through the FFN if dense (= tokens × layers)."""
    ffn_tokens_kept: int = 0
    """Σ over layers of tokens that ran the FFN."""
    sparse_pairs: int = 0
    """(token, layer) pairs in sparse-FFN layers."""
    sparse_pairs_kept: int = 0
    """Of those, the pairs whose FFN ran."""
    reused_tokens: int = 0
    """Prompt tokens whose KV was spliced from stored segments instead of computed."""

    def add_chunk(self, dims: ModelDims, shape: AttentionShape, start: int, end: int,
                  ffn_token_layers: int, sparse: tuple[int, int] = (0, 0),
                  tail: int = 0) -> None:
        """Account positions [start, end) of a prefill, whose FFN ran ``ffn_token_layers``
        (token, layer) pairs; ``sparse`` = (pairs, kept pairs) of the sparse layers; the
        last ``tail`` positions attended fully on every head."""
        n = end - start
        self.sparse_pairs += sparse[0]
        self.sparse_pairs_kept += sparse[1]
        proj = dims.num_layers * n * dims.projection_per_token
        dense_ffn_pairs = dims.num_layers * n
        self.tokens += n
        self.ffn_tokens_dense += dense_ffn_pairs
        self.ffn_tokens_kept += ffn_token_layers
        self.dense += (proj + AttentionShape.dense(dims).attention_flops(dims, start, end)
                       + dense_ffn_pairs * dims.ffn_per_token)
        self.redknot += (proj + shape.attention_flops(dims, start, end, tail)
                         + ffn_token_layers * dims.ffn_per_token)

    def add_reused(self, dims: ModelDims, start: int, end: int, layers_run: int = 0) -> None:
        """Account positions [start, end) whose KV was reused: dense computes them, RedKnot
        does not, but in the first ``layers_run`` layers (the blend choice's, counted at
        the dense rate); the relocation's few FLOPs per element are left out."""
        n = end - start
        self.reused_tokens += n
        full = (dims.num_layers * n * (dims.projection_per_token + dims.ffn_per_token)
                + AttentionShape.dense(dims).attention_flops(dims, start, end))
        self.dense += full
        if layers_run:
            self.redknot += full * min(layers_run, dims.num_layers) // dims.num_layers

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.redknot / self.dense if self.dense else 0.0

    @property
    def ffn_kept_fraction(self) -> float:
        return self.ffn_tokens_kept / self.ffn_tokens_dense if self.ffn_tokens_dense else 1.0

    @property
    def ffn_kept_fraction_sparse_layers(self) -> float:
        return self.sparse_pairs_kept / self.sparse_pairs if self.sparse_pairs else 1.0

    def merge(self, other: PrefillFlops) -> None:
        self.sparse_pairs += other.sparse_pairs
        self.sparse_pairs_kept += other.sparse_pairs_kept
        self.tokens += other.tokens
        self.dense += other.dense
        self.redknot += other.redknot
        self.ffn_tokens_dense += other.ffn_tokens_dense
        self.ffn_tokens_kept += other.ffn_tokens_kept
        self.reused_tokens += other.reused_tokens

    def as_dict(self) -> dict[str, float | int]:
        return {"prefill_tokens": self.tokens, "reused_tokens": self.reused_tokens,
                "flops_dense": self.dense,
                "flops_redknot": self.redknot, "flops_saved": round(self.saved_fraction, 6),
                "ffn_kept_fraction": round(self.ffn_kept_fraction, 6),
                "ffn_kept_fraction_sparse_layers": round(self.ffn_kept_fraction_sparse_layers, 6)}
