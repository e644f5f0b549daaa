"""Layer plans (head regrouping) and the per-step token maps."""

from __future__ import annotations

import types

import torch

from redknot_vllm.attention.metadata import build_metadata, tokens_to_row_end
from redknot_vllm.attention.plan import build_layer_plan, permute_attention_heads
from redknot_vllm.head_config import HeadConfig
from redknot_vllm.kernels.headclass_attention import FULL


def _hc():
    return HeadConfig.from_dict({
        "num_layers": 2, "num_kv_heads": 4, "dense_prefix_layers": 1,
        "kv_head_classification": [["local"] * 4, ["local", "global", "local", "retrieval"]],
        "kv_head_max_distance": [[8] * 4, [8, -1, 16, -1]],
    })


def test_plan_groups_are_contiguous_after_permutation():
    plan = build_layer_plan(_hc(), 1, 0, 1)
    assert plan.kv_perm == (1, 3, 0, 2)  # full heads first, then local by (window, sink)
    assert [(g.kv_heads, g.window) for g in plan.groups] == [((0, 1), FULL), ((2,), 8),
                                                            ((3,), 16)]
    dense = build_layer_plan(_hc(), 0, 0, 1)  # dense_prefix_layers
    assert dense.all_full and dense.is_identity


def test_plan_per_tp_rank():
    plan = build_layer_plan(_hc(), 1, 1, 2)  # rank 1 holds heads 2, 3
    assert plan.kv_perm == (1, 0) and plan.groups[0].window == FULL


class _Lin(torch.nn.Module):
    def __init__(self, out_f, in_f, bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_f, in_f))
        self.bias = torch.nn.Parameter(torch.randn(out_f)) if bias else None
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod

        self.quant_method = UnquantizedLinearMethod()

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_weight_permutation_preserves_the_layer_function():
    """Attention with permuted weights == attention with the original head order."""
    torch.manual_seed(0)
    hkv, per, d, hidden, n = 4, 2, 8, 16, 5
    attn = types.SimpleNamespace(
        qkv_proj=_Lin((hkv * per + 2 * hkv) * d, hidden, bias=True),
        o_proj=_Lin(hidden, hkv * per * d), head_dim=d, num_heads=hkv * per,
        q_size=hkv * per * d, kv_size=hkv * d)
    x = torch.randn(n, hidden)

    def run(a, kv_order):
        q, k, v = a.qkv_proj(x).split([a.q_size, a.kv_size, a.kv_size], -1)
        q = q.view(n, hkv, per, d)
        k, v = k.view(n, hkv, d), v.view(n, hkv, d)
        outs = []
        for h in range(hkv):  # per-KV-head toy attention whose result depends on the head
            s = torch.einsum("tpd,sd->tps", q[:, h], k[:, h]).softmax(-1)
            outs.append(torch.einsum("tps,sd->tpd", s, v[:, h]) * (1 + kv_order[h]))
        return a.o_proj(torch.stack(outs, 1).reshape(n, -1))

    plan = build_layer_plan(_hc(), 1, 0, 1)
    before = run(attn, list(range(hkv)))
    permute_attention_heads(attn, plan)
    after = run(attn, list(plan.kv_perm))  # head i now holds original head kv_perm[i]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_token_fields_with_interleaved_decode_rows():
    md = build_metadata(
        query_start_loc_cpu=[0, 1, 4, 5, 7], seq_lens_cpu=[9, 3, 20, 12],
        is_prefill_cpu=[False, True, False, True], block_table=torch.zeros(4, 1, dtype=torch.int32),
        slot_mapping=torch.zeros(7), device=torch.device("cpu"))
    assert md.max_query_len == 3 and md.max_seq_len == 20 and md.num_actual_tokens == 7
    assert md.token_row.tolist() == [0, 1, 1, 1, 2, 3, 3]
    assert md.token_pos.tolist() == [8, 0, 1, 2, 19, 10, 11]
    assert tokens_to_row_end(md).tolist() == [0, 2, 1, 0, 0, 1, 0]
    assert md.token_is_prefill.tolist() == [False, True, True, True, False, True, True]
    assert md.num_full_tokens == 2 and md.full_prefix_rows is None
    assert md.full_rows.tolist() == [0, 2] and md.full_token_index.tolist() == [0, 4]
    assert md.full_query_start_loc.tolist() == [0, 1, 2]


def test_token_fields_with_leading_decode_rows():
    md = build_metadata(
        query_start_loc_cpu=[0, 1, 2, 4], seq_lens_cpu=[5, 6, 2],
        is_prefill_cpu=[False, False, True], block_table=torch.zeros(3, 1, dtype=torch.int32),
        slot_mapping=torch.zeros(4), device=torch.device("cpu"))
    assert md.full_prefix_rows == 2 and md.num_full_tokens == 2


def test_full_tokens_include_prefill_tails():
    from redknot_vllm.attention.metadata import restrict_tokens

    md = build_metadata(
        query_start_loc_cpu=[0, 1, 9, 10, 14], seq_lens_cpu=[9, 8, 20, 4],
        is_prefill_cpu=[False, True, False, True], full_tail_cpu=[3, 3, 3, 10],
        block_table=torch.zeros(4, 1, dtype=torch.int32),
        slot_mapping=torch.arange(14), device=torch.device("cpu"))
    assert md.full_tail_cpu == [0, 3, 0, 4]  # decode rows have none; capped at the row
    # decode tokens 0 and 9, row 1's last 3 (6..8), all of row 3 (10..13)
    assert md.full_token_index.tolist() == [0, 6, 7, 8, 9, 10, 11, 12, 13]
    assert md.full_rows.tolist() == [0, 1, 2, 3] and md.num_full_tokens == 9
    assert md.full_query_start_loc.tolist() == [0, 1, 4, 5, 9] and md.max_full_query_len == 4
    keep = torch.ones(14, dtype=torch.bool)
    keep[3:5] = False  # row 1 splits into runs [1, 3) and [5, 9): the tail goes to the last
    small, _, _ = restrict_tokens(md, keep)
    assert small.full_tail_cpu == [0, 0, 3, 0, 4]
