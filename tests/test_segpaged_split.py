"""SegPaged's model-wide split of KV heads into a global and a local KV-cache group."""

from __future__ import annotations

import pytest

from redknot_vllm.head_config import HeadClass, HeadConfig
from redknot_vllm.kernels.headclass_attention import FULL


def _config(classes, windows, sinks, retrieval_blocks=None):
    d = {"schema_version": 1, "num_layers": len(classes), "num_kv_heads": len(classes[0]),
         "kv_head_classification": classes, "kv_head_max_distance": windows,
         "kv_head_sink_size": sinks}
    if retrieval_blocks:
        d["retrieval_blocks"] = retrieval_blocks
    return HeadConfig.from_dict(d, source="t.json")


def test_split_is_uniform_and_every_layers_global_heads_lead():
    from redknot_vllm.segpaged.split import split_kv_heads, split_layer_plan

    hc = _config(
        [["local", "global", "local", "local"], ["global", "local", "retrieval", "local"],
         ["local", "local", "local", "local"]],
        [[512, -1, 1024, 256], [-1, 256, -1, 2048], [512, 512, 128, 4096]],
        [[4, 4, 8, 4], [4, 4, 4, 16], [4, 4, 4, 4]],
        retrieval_blocks={"top_k": 2, "block": 64, "window": 256})
    sp = split_kv_heads(hc)
    assert (sp.kv_global, sp.kv_local) == (2, 2)
    for layer in range(3):
        plan, global_plan, local_plan = split_layer_plan(hc, layer, sp)
        local = local_plan.groups
        assert global_plan.groups + tuple(
            g for g in plan.groups if g.kv_heads[0] >= sp.kv_global) == plan.groups
        assert sorted(plan.kv_perm) == [0, 1, 2, 3]
        covered = [h for g in plan.groups for h in g.kv_heads]
        assert covered == [0, 1, 2, 3]  # contiguous, in order, each head once
        for g in plan.groups:  # no group straddles the boundary
            assert g.kv_heads[-1] < sp.kv_global or g.kv_heads[0] >= sp.kv_global
        # every full/retrieval head of the layer sits in the global range
        for pos, h in enumerate(plan.kv_perm):
            if hc.effective_class(layer, h) is not HeadClass.LOCAL:
                assert pos < sp.kv_global
        # the local layer's heads are local, re-indexed from 0, within the group's pages
        assert [h for g in local for h in g.kv_heads] == list(range(sp.kv_local))
        for g in local:
            assert g.window != FULL and not g.topk
            assert g.window <= sp.window and g.sink <= sp.sink
    # layer 2 (all local): the widest locals fill the global range
    plan, _, _ = split_layer_plan(hc, 2, sp)
    assert [hc.windows[2][h] for h in plan.kv_perm] == [4096, 512, 512, 128]
    # the local group's pages cover the widest local head left in any local range: layer
    # 1's locals (2048/16, 256/4) both stay local behind its global and retrieval heads
    assert (sp.window, sp.sink) == (2048, 16)


def test_a_layer_without_local_heads_is_refused_by_name():
    from redknot_vllm.segpaged.split import SegPagedError, split_kv_heads

    hc = _config([["global", "local"], ["global", "global"]],
                 [[-1, 512], [-1, -1]], [[4, 4], [4, 4]])
    with pytest.raises(SegPagedError, match="layer 1 has no local KV head"):
        split_kv_heads(hc)


def test_split_follows_tensor_parallel_ranks():
    from redknot_vllm.segpaged.split import split_kv_heads

    hc = HeadConfig.shape(4, 8, 0.25, window=1024, seed=3)
    total = split_kv_heads(hc)
    ranks = [split_kv_heads(hc, r, 2) for r in range(2)]
    assert all(s.kv_global + s.kv_local == 4 for s in ranks)
    assert total.kv_global <= sum(s.kv_global for s in ranks)
    assert all(s.window == 1024 for s in [total, *ranks])
