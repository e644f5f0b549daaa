"""Analytic FLOPs against brute-force sums of the evaluation formula."""

from __future__ import annotations

from redknot_vllm.dims import ModelDims
from redknot_vllm.flops import AttentionShape, PrefillFlops
from redknot_vllm.head_config import HeadConfig

DIMS = ModelDims(num_layers=3, hidden=64, intermediate=160, num_q_heads=4, num_kv_heads=2,
                 head_dim=16)


def brute(hc: HeadConfig | None, start: int, end: int, kept_pairs: int) -> int:
    d = DIMS
    total = 0
    per_kv = d.num_q_heads // d.num_kv_heads
    for li in range(d.num_layers):
        n = end - start
        total += 2 * n * d.hidden * (d.num_q_heads + 2 * d.num_kv_heads) * d.head_dim
        total += 2 * n * d.num_q_heads * d.head_dim * d.hidden
        for h in range(d.num_kv_heads):
            local = hc is not None and hc.effective_class(li, h).value == "local"
            for t in range(start, end):
                keys = min(t + 1, hc.windows[li][h] + hc.sinks[li][h]) if local else t + 1
                total += per_kv * 4 * d.head_dim * keys
    return total + kept_pairs * 6 * d.hidden * d.intermediate


def test_dense_and_redknot_match_brute_force():
    hc = HeadConfig.shape(3, 2, 0.5, window=5, sink=2, seed=3)
    acc = PrefillFlops()
    acc.add_chunk(DIMS, AttentionShape.from_head_config(DIMS, hc), 0, 40, ffn_token_layers=70)
    acc.add_chunk(DIMS, AttentionShape.from_head_config(DIMS, hc), 40, 57, ffn_token_layers=20)
    assert acc.dense == brute(None, 0, 57, 3 * 57)
    assert acc.redknot == brute(hc, 0, 40, 70) + brute(hc, 40, 57, 20)
    assert acc.tokens == 57
    assert abs(acc.ffn_kept_fraction - 90 / (3 * 57)) < 1e-12
    assert 0 < acc.saved_fraction < 1


def test_all_global_dense_ffn_saves_nothing():
    hc = HeadConfig.shape(3, 2, 1.0, window=5)
    acc = PrefillFlops()
    acc.add_chunk(DIMS, AttentionShape.from_head_config(DIMS, hc), 10, 30, 3 * 20)
    assert acc.saved_fraction == 0.0 and acc.dense == acc.redknot


def test_full_tail_counts_as_full_attention():
    hc = HeadConfig.shape(3, 2, 0.0, window=8, sink=2)
    shape = AttentionShape.from_head_config(DIMS, hc)
    dense = AttentionShape.dense(DIMS)
    plain = shape.attention_flops(DIMS, 0, 100)
    tail = shape.attention_flops(DIMS, 0, 100, tail=10)
    assert plain < tail < dense.attention_flops(DIMS, 0, 100)
    # the tail's 10 positions see every earlier key on every head
    assert tail - plain == shape.attention_flops(DIMS, 90, 100, tail=10) - \
        shape.attention_flops(DIMS, 90, 100)
    assert shape.attention_flops(DIMS, 90, 100, tail=10) == dense.attention_flops(DIMS, 90, 100)
