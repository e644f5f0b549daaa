"""The paged-KV helpers: what is written at a slot is read back at it, per head too."""

from __future__ import annotations

import torch

from redknot_vllm.kernels.paged_kv import gather_sequence_kv, read_kv, slots_of, write_kv

BLOCK = 16


def test_write_read_round_trip_over_layers_and_heads():
    torch.manual_seed(0)
    caches = [torch.zeros(6, 3, BLOCK, 8) for _ in range(2)]
    table = [4, 1, 5]  # a request's blocks, out of order
    pos = torch.arange(3, 40)
    slots = slots_of(table, pos, BLOCK)
    assert slots[0] == 4 * BLOCK + 3 and slots[-1] == 5 * BLOCK + 39 - 32
    kv = [(torch.randn(len(pos), 3, 4), torch.randn(len(pos), 3, 4)) for _ in caches]
    for c, (k, v) in zip(caches, kv, strict=True):
        write_kv(c, slots, k, v)
    k, v = read_kv(caches, slots)
    assert k.shape == (2, len(pos), 3, 4)
    torch.testing.assert_close(k, torch.stack([a for a, _ in kv]))
    torch.testing.assert_close(v, torch.stack([b for _, b in kv]))
    seq_k, seq_v = gather_sequence_kv(caches[0], torch.tensor(table), 40, 4)
    torch.testing.assert_close(seq_k[:, 3:].transpose(0, 1), kv[0][0])
    torch.testing.assert_close(seq_v[:, 3:].transpose(0, 1), kv[0][1])
    # only head 1 rewritten: heads 0 and 2 keep their values
    k2, v2 = torch.full_like(kv[0][0], 7.0), torch.full_like(kv[0][1], 9.0)
    write_kv(caches[0], slots, k2, v2, heads=torch.tensor([1]))
    k, v = read_kv(caches[:1], slots)
    assert k[0, :, 1].eq(7).all() and v[0, :, 1].eq(9).all()
    torch.testing.assert_close(k[0, :, 0], kv[0][0][:, 0])
    torch.testing.assert_close(v[0, :, 2], kv[0][1][:, 2])
