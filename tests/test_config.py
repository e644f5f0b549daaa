"""RedKnot options: sparse-FFN schedule, additional_config parsing, engine_args."""

from __future__ import annotations

import json

import pytest

from redknot_vllm.config import (
    RedKnotConfig,
    RedKnotConfigError,
    SparseFFNConfig,
    engine_args,
)
from redknot_vllm.head_config import HeadConfig, HeadConfigError


def test_sparse_thresholds_per_layer():
    s = SparseFFNConfig.from_dict({"dense_until": 2, "mass_thresh": 0.2,
                                   "deep_layer_start": 5, "mass_thresh_deep": 0.05,
                                   "recent_n": 16})
    assert [s.threshold(i) for i in (0, 1, 2, 4, 5, 9)] == [1.0, 1.0, 0.2, 0.2, 0.05, 0.05]


def test_keep_fraction_rule():
    s = SparseFFNConfig.from_dict({"keep_fraction": 0.15, "dense_until": 5})
    assert s.by_fraction and s.threshold(4) == 1.0 and s.threshold(5) == 0.15
    assert SparseFFNConfig.from_dict(s.to_dict()) == s


def test_seed_sparse_file_with_extra_informational_key(tmp_path):
    p = tmp_path / "llama.json"
    p.write_text(json.dumps({"dense_until": 20, "mass_thresh": 0.2, "deep_layer_start": 60,
                             "mass_thresh_deep": 0.05, "recent_n": 512,
                             "local_window": 4096}))
    assert SparseFFNConfig.from_json(p).recent_n == 512


@pytest.mark.parametrize("data,message", [
    ({"mass_thresh": 0.0}, "mass_thresh is 0.0; expected a number in (0, 1]"),
    ({"mass_thresh": 0.2, "recent_n": -1}, "recent_n is -1"),
    ({"mass_thresh": 0.2, "min_keep": 0}, "min_keep is 0"),
    ({"mass_thresh": 0.2, "deep_layer_start": 4}, "deep_layer_start and mass_thresh_deep go"),
    ({"mass_thresh": 0.2, "mass_thresh_deep": 1.5, "deep_layer_start": 3},
     "mass_thresh_deep is 1.5"),
    ({"mass_thresh": 0.2, "thresh": 0.1}, "unknown key(s) ['thresh']"),
    ({"dense_until": 3}, "missing required key 'mass_thresh'"),
    ({"mass_thresh": 0.2, "keep_fraction": 0.1}, "set exactly one of mass_thresh and keep"),
    ({"keep_fraction": 1.2}, "keep_fraction is 1.2"),
    ({"mass_thresh": True}, "mass_thresh is True"),
])
def test_sparse_config_errors(data, message):
    with pytest.raises(RedKnotConfigError) as e:
        SparseFFNConfig.from_dict(data)
    assert message in str(e.value)


def test_additional_config_unknown_option_is_an_error():
    with pytest.raises(RedKnotConfigError, match=r"unknown option\(s\) \['window'\]"):
        RedKnotConfig.from_additional_config({"redknot": {"head_config": None, "window": 3}})
    with pytest.raises(RedKnotConfigError, match="must be an object"):
        RedKnotConfig.from_additional_config({"redknot": "on"})
    assert RedKnotConfig.from_additional_config({"other_plugin": {}}) is None


def test_additional_config_round_trip():
    hc = HeadConfig.shape(4, 2, 0.5, 32)
    cfg = RedKnotConfig(hc, SparseFFNConfig(mass_thresh=0.3, dense_until=1))
    back = RedKnotConfig.from_additional_config(json.loads(json.dumps(
        cfg.to_additional_config())))
    assert back is not None and back.head_config is not None
    assert back.head_config.classes == hc.classes
    assert back.sparse_ffn == SparseFFNConfig(mass_thresh=0.3, dense_until=1,
                                             source="<dict>")


def _model_dir(tmp_path, arch="LlamaForCausalLM", layers=4, kv=2):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": [arch], "num_hidden_layers": layers, "num_key_value_heads": kv,
        "num_attention_heads": 4, "hidden_size": 64, "intermediate_size": 128}))
    return str(tmp_path)


def test_engine_args_wires_vllm_channels(tmp_path):
    model = _model_dir(tmp_path)
    args = engine_args(model, head_config=HeadConfig.shape(4, 2, 0.5, 32),
                       sparse_ffn={"mass_thresh": 0.5, "dense_until": 1}, enforce_eager=True,
                       hf_overrides={"rope_theta": 1.0})
    assert args["hf_overrides"] == {"rope_theta": 1.0,
                                    "architectures": ["RedKnotLlamaForCausalLM"]}
    assert args["additional_config"]["redknot"]["sparse_ffn"]["mass_thresh"] == 0.5
    assert args["kv_transfer_config"]["kv_connector"] == "RedKnotConnector"
    assert args["worker_extension_cls"] == "redknot_vllm.worker_extension.RedKnotWorkerExtension"
    assert args["enforce_eager"] is True and args["model"] == model
    json.dumps(args)  # everything crosses process boundaries as JSON
    plain = engine_args(model, request_stats=False)
    assert "kv_transfer_config" not in plain
    assert plain["worker_extension_cls"] == "redknot_vllm.worker_extension.RedKnotWorkerExtension"
    assert plain["additional_config"]["redknot"]["head_config"] is None


def test_engine_args_rejects_misfit_before_engine_start(tmp_path):
    model = _model_dir(tmp_path, layers=4, kv=2)
    with pytest.raises(HeadConfigError, match="num_layers is 5 but the model has 4"):
        engine_args(model, head_config=HeadConfig.shape(5, 2, 0.5, 32))
    with pytest.raises(HeadConfigError, match="tensor_parallel_size=3 is not a multiple"):
        engine_args(model, head_config=HeadConfig.shape(4, 2, 0.5, 32),
                    tensor_parallel_size=3)
    with pytest.raises(RedKnotConfigError, match="dense_until=9 exceeds"):
        engine_args(model, sparse_ffn={"mass_thresh": 0.3, "dense_until": 9})


def test_engine_args_unsupported_architecture_and_conflicts(tmp_path):
    with pytest.raises(RedKnotConfigError, match="GPT2LMHeadModel is not supported"):
        engine_args(_model_dir(tmp_path, arch="GPT2LMHeadModel"))
    model = _model_dir(tmp_path)
    with pytest.raises(RedKnotConfigError, match="kv_transfer_config is already set"):
        engine_args(model, kv_transfer_config={"kv_connector": "X"})
    with pytest.raises(RedKnotConfigError, match="hf_overrides already sets architectures"):
        engine_args(model, hf_overrides={"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(RedKnotConfigError, match=r"has no config\.json"):
        engine_args(str(tmp_path / "nowhere"))


def test_redknot_model_without_head_config_runs_dense_and_says_so():
    import logging
    import types

    from redknot_vllm.models.apply import apply_redknot

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("redknot_vllm.models.apply")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        cfg = types.SimpleNamespace(additional_config={})
        model = type("RedKnotTestForCausalLM", (), {})()
        assert apply_redknot(model, cfg) is None
        assert apply_redknot(model, cfg) is None
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    msgs = [r.getMessage() for r in records]
    assert len(msgs) == 1 and "running dense" in msgs[0]  # said once
