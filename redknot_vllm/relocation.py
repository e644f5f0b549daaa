"""RoPE relocation of stored keys, for offline KV reuse.

A document's K is computed once at positions ``[0, L)``; vLLM caches K *after* RoPE, so
reusing it at ``[p, p + L)`` inside another prompt means rotating every key from its source
position to its destination position. This uses the model's own vLLM rotary embedding
(``self_attn.rotary_emb``), reading only ``cos_sin_cache`` (``[max_pos, rotary_dim]``, cos
half then sin half), ``is_neox_style``, ``rotary_dim`` and ``head_size``, which vLLM 0.26
and 0.32 both have.

Numerics. Rotating by the angle of ``p`` is wrong in fp32 at large positions:
``angle(p) + angle(i)`` is not ``fl(angle(p + i))``. Instead each key is rotated back by the
cache row at its source position and forward by the row at its destination, i.e. by the
very rows a fresh computation reads. The two rotations are composed per token and
frequency from the rows (products of cos/sin, no angle arithmetic), in fp32.

No magnitude. Some caches carry a scale (YaRN's ``mscale``: cos and sin both times
``mscale``, applied to q and k alike). A stored key already has it; applying it again would
square it. So both rows are normalised to unit length (``/ sqrt(cos^2 + sin^2)``) and the
relocation is a pure rotation. Values (V) carry no position and are never relocated.
"""

from __future__ import annotations

import torch

# Rotary classes whose cache is a fixed position -> rotation table with one frequency set,
# matched by exact class name: several position-dependent schemes subclass RotaryEmbedding.
RELOCATABLE = frozenset({
    "RotaryEmbedding",
    "Llama3RotaryEmbedding",
    "YaRNScalingRotaryEmbedding",
    "LinearScalingRotaryEmbedding",
    "NTKScalingRotaryEmbedding",
})
_WHY_NOT = {
    "DynamicNTKScalingRotaryEmbedding": "dynamic NTK: the frequencies depend on the length",
    "DynamicNTKAlphaRotaryEmbedding": "dynamic NTK: the frequencies depend on the length",
    "Phi3LongRoPEScaledRotaryEmbedding": "LongRoPE switches short/long factors by length",
    "MRotaryEmbedding": "multimodal (M-RoPE) positions are not one integer per token",
    "MRotaryEmbeddingInterleaved": "multimodal (M-RoPE) positions are not one integer per token",
    "BailingMRotaryEmbedding": "multimodal (M-RoPE) positions are not one integer per token",
    "Ernie4_5_VLRotaryEmbedding": "multimodal (M-RoPE) positions are not one integer per token",
    "DualChunkRotaryEmbedding": "dual-chunk attention rotates by chunk-relative positions",
}


def check_relocatable(rotary_emb: torch.nn.Module) -> None:
    """Raise ``NotImplementedError`` unless keys rotated by ``rotary_emb`` can be relocated."""
    name = type(rotary_emb).__name__
    if name not in RELOCATABLE:
        why = _WHY_NOT.get(name, "not known to be a fixed per-position rotation")
        raise NotImplementedError(
            f"offline KV reuse is not supported for {name} ({why}): stored keys cannot be "
            "moved to new positions exactly; serve this model without KV reuse")
    if name == "LinearScalingRotaryEmbedding" and len(rotary_emb.scaling_factors) > 1:
        raise NotImplementedError(
            "offline KV reuse is not supported for LinearScalingRotaryEmbedding with several "
            "scaling factors (one cache per LoRA factor); serve this model without KV reuse")


def _positions(pos: torch.Tensor | int, num_tokens: int, device: torch.device) -> torch.Tensor:
    if isinstance(pos, int):
        return torch.arange(pos, pos + num_tokens, device=device)
    if pos.shape != (num_tokens,):
        raise ValueError(f"positions have shape {tuple(pos.shape)}, expected ({num_tokens},)")
    return pos.to(device=device, dtype=torch.long)


def rope_rows(rotary_emb: torch.nn.Module,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-magnitude fp32 ``(cos, sin)``, ``[n, rotary_dim // 2]``, of the cache rows at
    ``positions``, on the device of ``positions``."""
    cache = rotary_emb.cos_sin_cache
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= len(cache)):
        raise ValueError(
            f"positions must lie in [0, {len(cache)}), got [{int(positions.min())}, "
            f"{int(positions.max())}]: the rotary cache stops at the model's "
            "max_position_embeddings (times its RoPE scaling factor, if any)")
    rows = cache.index_select(0, positions.to(cache.device)).to(positions.device, torch.float32)
    cos, sin = rows.chunk(2, dim=-1)
    norm = torch.hypot(cos, sin)
    return cos / norm, sin / norm


def relocation_rows(rotary_emb: torch.nn.Module, src_pos: torch.Tensor,
                    dst_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)``, ``[n, 1, rotary_dim // 2]``: per token and frequency, the rotation
    ``R(dst) @ R(src)^T`` that moves a key from ``src_pos`` to ``dst_pos`` (positions on the
    keys' device). Shared by every layer of a model, so compute it once per step."""
    cs, ss = rope_rows(rotary_emb, src_pos)
    cd, sd = rope_rows(rotary_emb, dst_pos)
    return (cd * cs + sd * ss).unsqueeze(-2), (sd * cs - cd * ss).unsqueeze(-2)


def relocate_keys(k: torch.Tensor, src_pos: torch.Tensor | int, dst_pos: torch.Tensor | int,
                  rotary_emb: torch.nn.Module, *, out: torch.Tensor | None = None,
                  rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Move post-RoPE keys from ``src_pos`` to ``dst_pos``.

    ``k``: ``[..., num_tokens, num_kv_heads, head_size]`` (leading dims, e.g. layers, share
    the positions). ``src_pos``/``dst_pos``: per-token positions ``[num_tokens]``, or an int
    start (positions ``start + arange(num_tokens)``). ``rows``: their
    :func:`relocation_rows`, if already computed (the positions are then not read). Only the
    first ``rotary_dim`` dims rotate; the rest are copied. Computed in fp32 on ``k``'s
    device, returned in ``k``'s dtype, written to ``out`` if given (``out=k`` relocates in
    place). Keys only: values are position-free and must not be passed here.
    """
    check_relocatable(rotary_emb)
    if k.dim() < 3 or k.shape[-1] != rotary_emb.head_size:
        raise ValueError(f"keys of shape {tuple(k.shape)} are not [..., tokens, heads, "
                         f"{rotary_emb.head_size}]")
    n = k.shape[-3]
    if rows is None:
        rows = relocation_rows(rotary_emb, _positions(src_pos, n, k.device),
                               _positions(dst_pos, n, k.device))
    cos, sin = rows
    if cos.shape[0] != n:
        raise ValueError(f"rows are for {cos.shape[0]} tokens, keys have {n}")

    r = rotary_emb.rotary_dim
    x = k[..., :r].float()
    if rotary_emb.is_neox_style:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if rotary_emb.is_neox_style:
        rot = torch.cat((o1, o2), dim=-1)
    else:
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)

    if out is None:
        out = torch.empty_like(k)
    if out is not k and r < k.shape[-1]:
        out[..., r:].copy_(k[..., r:])
    out[..., :r].copy_(rot)
    return out
