"""Head-class config: strict validation, model checks, round trip."""

from __future__ import annotations

import copy
import json

import pytest

from redknot_vllm.head_config import HeadClass, HeadConfig, HeadConfigError


def good() -> dict:
    return {
        "num_layers": 2,
        "num_kv_heads": 3,
        "dense_prefix_layers": 1,
        "retrieval_top_p": 0.9,
        "kv_head_classification": [["global", "local", "retrieval"],
                                   ["streaming", "dense", "local"]],
        "kv_head_max_distance": [[-1, 256, -1], [128, 0, 512]],
        "kv_head_sink_size": [[4, 4, 4], [4, 8, 0]],
        "provenance": {"method": "test"},
    }


def mutate(path: list, value) -> dict:
    d = copy.deepcopy(good())
    node = d
    for p in path[:-1]:
        node = node[p]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


DELETE = object()

MALFORMED = [
    ("not an object", [1, 2], "expected a JSON object"),
    ("missing classes", mutate(["kv_head_classification"], DELETE),
     "missing required key(s) ['kv_head_classification']"),
    ("unknown key", mutate(["kv_head_windows"], [[1]]), "unknown key(s) ['kv_head_windows']"),
    ("num_layers not int", mutate(["num_layers"], "2"), "num_layers is '2'"),
    ("num_kv_heads zero", mutate(["num_kv_heads"], 0), "num_kv_heads is 0"),
    ("bool as int", mutate(["num_layers"], True), "num_layers is True"),
    ("too few rows", mutate(["kv_head_classification"], [["global"] * 3]),
     "kv_head_classification must be a list of num_layers=2 rows, got a list of 1 rows"),
    ("short row", mutate(["kv_head_max_distance", 1], [128, 0]),
     "kv_head_max_distance[1] (layer 1) must list num_kv_heads=3 entries, got 2"),
    ("unknown class", mutate(["kv_head_classification", 1, 2], "sparse"),
     "kv_head_classification[1][2] (layer 1, head 2) is 'sparse'; expected one of"),
    ("local without window", mutate(["kv_head_max_distance", 0, 1], -1),
     "kv_head_max_distance[0][1] is -1 but layer 0 head 1 is 'local'"),
    ("global with window", mutate(["kv_head_max_distance", 0, 0], 64),
     "kv_head_max_distance[0][0] is 64 but layer 0 head 0 is 'global'"),
    ("window not int", mutate(["kv_head_max_distance", 1, 2], 512.5),
     "kv_head_max_distance[1][2] (layer 1, head 2) is 512.5; expected an integer"),
    ("negative sink", mutate(["kv_head_sink_size", 1, 0], -2),
     "kv_head_sink_size[1][0] is -2; expected >= 0"),
    ("top_p out of range", mutate(["retrieval_top_p"], 1.5), "retrieval_top_p is 1.5"),
    ("dense prefix too big", mutate(["dense_prefix_layers"], 3),
     "dense_prefix_layers is 3; expected an integer in [0, num_layers=2]"),
    ("row not a list", mutate(["kv_head_sink_size", 0], "4,4,4"),
     "kv_head_sink_size[0] (layer 0) must list num_kv_heads=3 entries, got str"),
]


@pytest.mark.parametrize("name,data,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_configs_are_rejected(name, data, message):
    with pytest.raises(HeadConfigError) as e:
        HeadConfig.from_dict(data, source="cfg.json")
    assert message in str(e.value)
    assert str(e.value).startswith("head config cfg.json: ")


def test_good_config_semantics():
    hc = HeadConfig.from_dict(good())
    assert hc.classes[1][0] is HeadClass.LOCAL  # legacy alias "streaming"
    assert hc.effective_class(0, 1) is HeadClass.DENSE  # dense_prefix_layers=1
    assert hc.effective_class(1, 2) is HeadClass.LOCAL
    assert hc.windows[0] == (-1, 256, -1) and hc.windows[1] == (128, -1, 512)
    assert hc.counts() == {"local": 2, "global": 0, "retrieval": 0, "dense": 4}
    assert hc.defaults_applied == ()
    assert "6 KV heads: 0 global, 2 local (window [128, 512], sink [0, 4])" in hc.summary()


def test_missing_sink_takes_seed_default_and_says_so():
    hc = HeadConfig.from_dict(mutate(["kv_head_sink_size"], DELETE))
    assert hc.sinks[1] == (4, 4, 4)
    assert hc.defaults_applied == ("kv_head_sink_size=4",)


@pytest.mark.parametrize("layers,heads,tp,message", [
    (3, 3, 1, "num_layers is 2 but the model has 3 decoder layers"),
    (2, 4, 1, "num_kv_heads is 3 but the model has 4 KV heads"),
    (2, 3, 2, "3 KV heads cannot be split over tensor_parallel_size=2"),
    (2, 3, 4, "tensor_parallel_size=4 is not a multiple of the 3 KV heads"),
])
def test_validate_for_model(layers, heads, tp, message):
    with pytest.raises(HeadConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HeadConfig.from_dict(good()).validate_for_model(layers, heads, tp)


def test_validate_for_model_accepts_fitting_tp():
    HeadConfig.from_dict(good()).validate_for_model(2, 3, 3)
    HeadConfig.from_dict(good()).validate_for_model(2, 3, 6)  # replicated KV heads


def test_rank_kv_heads_follow_vllm_sharding():
    hc = HeadConfig.shape(2, 8, 0.25, 64)
    assert hc.rank_kv_heads(1, 4) == [2, 3]
    hc2 = HeadConfig.shape(2, 2, 0.5, 64)
    assert [hc2.rank_kv_heads(r, 8)[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_round_trip_and_hash(tmp_path):
    hc = HeadConfig.from_dict(good(), source="a")
    path = tmp_path / "h.json"
    hc.save_json(path)
    back = HeadConfig.from_json(path)
    for f in ("classes", "windows", "sinks", "retrieval_top_p", "dense_prefix_layers"):
        assert getattr(back, f) == getattr(hc, f), f
    assert back.content_hash() == hc.content_hash()
    assert json.loads(path.read_text())["provenance"] == {"method": "test"}
    changed = HeadConfig.from_dict(mutate(["kv_head_max_distance", 0, 1], 255))
    assert changed.content_hash() != hc.content_hash()


def test_invalid_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(HeadConfigError, match="is not valid JSON"):
        HeadConfig.from_json(p)
    with pytest.raises(HeadConfigError, match="cannot read head config"):
        HeadConfig.from_json(tmp_path / "missing.json")


def test_shape_config_proportions():
    hc = HeadConfig.shape(30, 3, 0.2, 1024, seed=0)
    assert hc.counts()["global"] == 18 and hc.counts()["local"] == 72
    assert HeadConfig.shape(30, 3, 0.2, 1024, seed=0) == hc
    assert HeadConfig.shape(30, 3, 0.2, 1024, seed=1).classes != hc.classes


def test_shipped_demo_config_loads():
    import importlib.resources

    root = importlib.resources.files("redknot_vllm.head_class")
    hc = HeadConfig.from_json(str(root / "smollm2-135m-instruct.shape80.json"))
    hc.validate_for_model(30, 3, 1)
    assert hc.counts()["local"] == 72


def test_shipped_qwen05_config_loads():
    """The Qwen2.5-Coder-0.5B quality default: the profiler's output, with its provenance."""
    import importlib.resources

    root = importlib.resources.files("redknot_vllm.head_class")
    hc = HeadConfig.from_json(str(root / "qwen2.5-coder-0.5b-instruct.json"))
    hc.validate_for_model(24, 2, 1)
    assert hc.counts() == {"global": 12, "retrieval": 36, "local": 0, "dense": 0}
    assert hc.tail_full_tokens == 128
    rb = hc.retrieval_blocks
    assert rb is not None and (rb.top_k, rb.block, rb.window) == (8, 128, 1024)
    assert hc.info["provenance"]["parameters"]["device"] == "cuda"


def _with_retrieval(blocks):
    from redknot_vllm.head_config import HeadConfig

    d = HeadConfig.shape(4, 2, 0.5, window=64, seed=1).to_dict()
    d["kv_head_classification"][2] = ["retrieval", "local"]
    d["kv_head_max_distance"][2] = [-1, 64]
    if blocks is not None:
        d["retrieval_blocks"] = blocks
    return HeadConfig.from_dict(d, source="r.json")


@pytest.mark.parametrize("blocks,message", [
    ({"top_k": 8, "block": 64}, "exactly top_k, block and window"),
    ({"top_k": 0, "block": 64, "window": 1024}, "retrieval_blocks.top_k is 0"),
    ({"top_k": 8, "block": 40, "window": 1024}, "multiple of 16"),
    ({"top_k": 8, "block": 64, "window": 1000}, "multiple of block=64"),
    ({"top_k": True, "block": 64, "window": 1024}, "retrieval_blocks.top_k is True"),
])
def test_bad_retrieval_blocks_name_the_field(blocks, message):
    from redknot_vllm.head_config import HeadConfigError

    with pytest.raises(HeadConfigError, match=message):
        _with_retrieval(blocks)


def test_retrieval_heads_are_block_sparse_only_with_retrieval_blocks():
    from redknot_vllm.attention.plan import build_layer_plan

    plain = build_layer_plan(_with_retrieval(None), 2, 0, 1)
    assert [g.topk for g in plain.groups] == [0, 0]  # full (as before) and local
    hc = _with_retrieval({"top_k": 8, "block": 64, "window": 1024})
    plan = build_layer_plan(hc, 2, 0, 1)
    assert [(g.kv_heads, g.window, g.topk, g.block) for g in plan.groups] == [
        ((0,), 1024, 8, 64), ((1,), 64, 0, 0)]
    assert not plan.all_full
    assert "1 retrieval (block-sparse: top 8 blocks of 64, window 1024)" in hc.summary()
    # the key appears only when set, so configs without it keep their content hash
    assert "retrieval_blocks" not in _with_retrieval(None).to_dict()
    assert hc.content_hash() != _with_retrieval(None).content_hash()
