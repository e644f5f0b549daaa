"""The one paged-KV-cache read/write helper, in plain torch (CPU and CUDA alike).

Every RedKnot layer's cache is vLLM's logical ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` view (K in ``[..., :head_size]``, V in ``[..., head_size:]``), whatever
its physical stride order; a token at slot ``s`` lives in block ``s // block_size`` at
offset ``s % block_size``::

    slot = block_table[row][pos // block_size] * block_size + pos % block_size

Three access patterns, each once: :func:`write_kv` (tokens by slot, optionally only some
heads), :func:`read_kv` (tokens by slot, every layer's cache stacked) and
:func:`gather_sequence_kv` (one sequence's whole context, block by block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def slots_of(block_ids: Sequence[int] | torch.Tensor, positions: torch.Tensor,
             block_size: int) -> torch.Tensor:
    """Slots of ``positions`` of a request whose block-table row is ``block_ids``."""
    table = torch.as_tensor(block_ids, dtype=torch.long, device=positions.device)
    return table[positions // block_size] * block_size + positions % block_size


def write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, heads: torch.Tensor | None = None, *,
             slots_checked: bool = False) -> None:
    """Store K/V ``[n, num_kv_heads, head_size]`` at ``slots`` ``[>= n]`` int64.

    Negative slots (vLLM's padding) are skipped. With ``heads`` (int64 indices) only those
    KV heads are written, from the same head positions of ``key``/``value``.
    ``slots_checked``: the caller has verified every slot is >= 0 (the check reads a device
    value, a host sync: a caller writing many layers checks once).
    """
    n = key.shape[0]
    slots = slots[:n].long()
    if not slots_checked:
        valid = slots >= 0
        if not bool(valid.all()):
            slots, key, value = slots[valid], key[valid], value[valid]
    bs = kv_cache.shape[2]
    blocks, offs = slots // bs, slots % bs
    kv = torch.cat([key, value], dim=-1).to(kv_cache.dtype)
    if heads is None:
        kv_cache[blocks, :, offs] = kv
    else:
        kv_cache[blocks[:, None], heads[None, :], offs[:, None]] = kv[:, heads]


def read_kv(caches: Sequence[torch.Tensor], slots: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[num_layers, n, num_kv_heads, head_size]`` at ``slots`` from every layer."""
    bs, d = caches[0].shape[2], caches[0].shape[3] // 2
    slots = slots.to(caches[0].device)
    blocks, offs = slots // bs, slots % bs
    kv = torch.stack([c[blocks, :, offs] for c in caches])  # [layers, n, H, 2D]
    return kv[..., :d], kv[..., d:]


def gather_sequence_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
                       head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first ``seq_len`` tokens, read block by block.

    Args:
        block_ids: ``[>= ceil(seq_len / block_size)]`` the sequence's block-table row.

    Returns:
        K, V each ``[num_kv_heads, seq_len, head_size]`` (copies, contiguous).
    """
    _, num_kv_heads, block_size, _ = kv_cache.shape
    num_blocks = -(-seq_len // block_size)
    kv = kv_cache[block_ids[:num_blocks].long()]  # [nb, H, bs, 2D]
    kv = kv.transpose(0, 1).reshape(num_kv_heads, num_blocks * block_size, 2 * head_size)
    kv = kv[:, :seq_len]
    return kv[..., :head_size].contiguous(), kv[..., head_size:].contiguous()
