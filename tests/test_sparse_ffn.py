"""The sparse-FFN selection rule."""

from __future__ import annotations

import pytest
import torch

from redknot_vllm.sparse_ffn import select_tokens


def rows_of(lengths):
    row = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    ends = torch.cumsum(torch.tensor(lengths), 0)
    to_end = ends[row] - 1 - torch.arange(len(row))
    return row, to_end


def select(imp, lengths=None, prefill=None, thresh=0.5, recent_n=0, min_keep=1):
    imp = torch.tensor(imp, dtype=torch.float32)
    lengths = lengths or [len(imp)]
    row, to_end = rows_of(lengths)
    pf = torch.ones(len(imp), dtype=torch.bool) if prefill is None else torch.tensor(prefill)
    return select_tokens(imp, row, len(lengths), pf, to_end, thresh, recent_n, min_keep).tolist()


def test_keeps_prefix_of_ranking_strictly_below_threshold():
    # shares 0.4, 0.3, 0.2, 0.1 -> cumulative 0.4, 0.7, 0.9, 1.0
    assert select([0.3, 0.4, 0.1, 0.2], thresh=0.75) == [True, True, False, False]
    # the token whose cumulative share reaches the threshold is excluded
    assert select([0.3, 0.4, 0.1, 0.2], thresh=0.7) == [False, True, False, False]
    assert select([0.3, 0.4, 0.1, 0.2], thresh=0.9000001) == [True, True, False, True]


def test_top_token_always_kept_even_above_threshold():
    assert select([0.1, 0.9, 0.0], thresh=0.05) == [False, True, False]


def test_threshold_one_keeps_all():
    assert select([0.0, 5.0, 1.0], thresh=1.0) == [True, True, True]


def test_recent_n_tokens_always_kept():
    assert select([0.9, 0.05, 0.05, 0.0], thresh=0.5, recent_n=2) == [True, False, True, True]
    assert select([0.9, 0.05, 0.05, 0.0], thresh=0.5, recent_n=10) == [True] * 4


def test_min_keep_adds_top_tokens_only_when_short():
    imp = [0.97, 0.02, 0.01, 0.0]
    assert select(imp, thresh=0.5, min_keep=3) == [True, True, True, False]
    # recent_n already keeps 3 tokens: min_keep adds nothing
    assert select(imp, thresh=0.5, min_keep=3, recent_n=2) == [True, False, True, True]


def test_all_zero_importance_keeps_everything():
    assert select([0.0, 0.0, 0.0], thresh=0.2) == [True, True, True]


def test_rows_are_independent():
    imp = [0.6, 0.4, 0.0] + [0.1, 0.1, 0.8] + [0.0, 0.0]
    out = select(imp, lengths=[3, 3, 2], thresh=0.5)
    assert out == [True, False, False] + [False, False, True] + [True, True]


def test_decode_tokens_always_run():
    imp = [0.9, 0.1, 0.0, 0.3]
    prefill = [True, True, True, False]
    assert select(imp, lengths=[3, 1], prefill=prefill, thresh=0.5) == [True, False, False,
                                                                         True]


def test_ties_are_broken_deterministically_by_position():
    out1 = select([0.25] * 4, thresh=0.6)
    out2 = select([0.25] * 4, thresh=0.6)
    assert out1 == out2 == [True, True, False, False]


def test_large_batch_matches_per_row_loop():
    g = torch.Generator().manual_seed(0)
    lengths = [1, 700, 33, 4096, 5]
    imp = torch.rand(sum(lengths), generator=g) ** 4
    row, to_end = rows_of(lengths)
    pf = torch.ones(len(imp), dtype=torch.bool)
    got = select_tokens(imp, row, len(lengths), pf, to_end, 0.3, 16, 4)
    start = 0
    for n in lengths:
        seg = imp[start:start + n].double()
        order = torch.sort(seg, descending=True, stable=True).indices
        frac = torch.cumsum(seg[order], 0) / seg.sum()
        want = torch.zeros(n, dtype=torch.bool)
        want[order[(frac < 0.3) | (torch.arange(n) == 0)]] = True
        want[max(0, n - 16):] = True
        if want.sum() < 4:
            want[order[:4]] = True
        assert torch.equal(got[start:start + n], want), n
        start += n


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_inputs(n):
    assert select([1.0] * n, thresh=0.1) == [True] * n


def test_keep_fraction_rule_keeps_top_ceil_share():
    imp = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.0, 0.3], dtype=torch.float32)
    row, to_end = rows_of([6])
    pf = torch.ones(6, dtype=torch.bool)
    keep = select_tokens(imp, row, 1, pf, to_end, 0.3, 0, 1, by_fraction=True)
    assert keep.tolist() == [False, True, False, True, False, False]  # ceil(0.3 * 6) = 2
    keep = select_tokens(imp, row, 1, pf, to_end, 0.34, 0, 1, by_fraction=True)
    assert keep.tolist() == [False, True, False, True, False, True]  # ceil(2.04) = 3
