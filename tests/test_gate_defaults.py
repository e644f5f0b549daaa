"""Shipped quality defaults require their gate; gates key on the weights' values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from redknot_vllm import HeadConfig
from redknot_vllm.config import RedKnotConfig, engine_args, resolve_require_gate
from redknot_vllm.defaults import QUALITY_DEFAULTS, quality_default_name, shipped_dir
from redknot_vllm.fingerprint import model_fingerprint, weights_fingerprint

SHIPPED_GATES = sorted((shipped_dir() / "gates").glob("*.json"))


def _folder(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
            config: dict | None = None) -> Path:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


def test_weights_fingerprint_sees_values_not_file_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_REDKNOT_CACHE_DIR", str(tmp_path / "cache"))
    a, b = torch.arange(12.0).view(3, 4), torch.ones(5, dtype=torch.bfloat16)
    one = _folder(tmp_path / "one", {"a": a, "b": b}, config={"transformers_version": "4"})
    # another converter: other header metadata, other config.json text, other insertion order
    two = _folder(tmp_path / "two", {"b": b, "a": a}, metadata={"format": "pt", "x": "y"},
                  config={"transformers_version": "5"})
    three = _folder(tmp_path / "three", {"a": a + 1, "b": b})
    assert weights_fingerprint(one, "bfloat16") == weights_fingerprint(two, "bfloat16")
    assert model_fingerprint(one, "bfloat16") != model_fingerprint(two, "bfloat16")
    assert weights_fingerprint(one, "bfloat16") != weights_fingerprint(three, "bfloat16")
    assert weights_fingerprint(one, "bfloat16") != weights_fingerprint(one, "float32")


@pytest.mark.parametrize("name", QUALITY_DEFAULTS)
def test_a_quality_default_is_recognised_by_content(name, tmp_path):
    hc = HeadConfig.from_json(str(shipped_dir() / name))
    assert quality_default_name(hc) == name
    data = json.loads((shipped_dir() / name).read_text())
    copy = HeadConfig.from_dict({**data, "provenance": {"copied": True}}, source="copy")
    assert quality_default_name(copy) == name  # a copy (provenance aside) is the default
    edited = HeadConfig.from_dict({**data, "tail_full_tokens": 7}, source="edited")
    assert quality_default_name(edited) is None
    assert quality_default_name(HeadConfig.shape(30, 3, 0.5, window=64)) is None


def test_the_gate_is_required_by_default_for_a_shipped_default_only():
    shipped = HeadConfig.from_json(str(shipped_dir() / QUALITY_DEFAULTS[0]))
    own = HeadConfig.shape(30, 3, 0.5, window=64)
    assert resolve_require_gate(shipped, None) is True
    assert resolve_require_gate(shipped, False) is False  # opted out (logged)
    assert resolve_require_gate(own, None) is False  # a user's config (logged)
    assert resolve_require_gate(own, True) is True
    assert resolve_require_gate(None, None) is False
    parsed = RedKnotConfig.from_additional_config(
        {"redknot": {"head_config": str(shipped_dir() / QUALITY_DEFAULTS[0])}})
    assert parsed.require_gate is True  # `vllm serve --additional-config` too


def test_engine_args_carry_the_resolved_requirement(smollm2):
    args = engine_args(smollm2, head_config=str(shipped_dir() / "smollm2-135m-instruct.json"))
    assert args["additional_config"]["redknot"]["require_gate"] is True
    args = engine_args(smollm2, head_config=HeadConfig.shape(30, 3, 0.5, window=64))
    assert args["additional_config"]["redknot"]["require_gate"] is False


def test_shipped_gate_results_are_passed_results_of_the_defaults():
    from redknot_vllm.gate import GateResult, gate_key

    assert SHIPPED_GATES, "no shipped gate results in head_class/gates/"
    defaults = {HeadConfig.from_json(str(shipped_dir() / n)).content_hash(): n
                for n in QUALITY_DEFAULTS}
    covered = set()
    for path in SHIPPED_GATES:
        r = GateResult(**json.loads(path.read_text()))
        assert r.passed and r.head_config_hash in defaults, path.name
        cfg = RedKnotConfig(HeadConfig.from_json(str(shipped_dir()
                                                     / defaults[r.head_config_hash])))
        assert path.stem == gate_key(r.model_fingerprint, cfg), path.name
        covered.add(defaults[r.head_config_hash])
    assert covered == set(QUALITY_DEFAULTS)


def test_the_shipped_smollm2_gate_matches_the_embedded_model(smollm2):
    """The shipped record holds for this checkout's conversion of the embedded model."""
    from redknot_vllm.gate import lookup

    cfg = RedKnotConfig(HeadConfig.from_json(str(shipped_dir() / "smollm2-135m-instruct.json")))
    result = lookup(smollm2, cfg, "float32")
    assert result is not None and result.passed


def test_the_shipped_qwen_gate_holds_for_the_h200s_conversion():
    """The tensor digests of the H200 host's conversion (committed) give the fingerprint
    the shipped Qwen2.5-0.5B bf16 gate result was keyed on here."""
    import hashlib

    from redknot_vllm.gate import GateResult

    raw = Path(__file__).resolve().parents[1] / "benchmarks/results/raw"
    digests = json.loads((raw / "conversion-digests-qwen05.json").read_text())["digests"]
    h = hashlib.sha256(b"redknot-weights-v1|dtype=bfloat16")
    for name in sorted(digests):
        h.update(f"|{name}={digests[name]}".encode())
    results = [GateResult(**json.loads(p.read_text())) for p in SHIPPED_GATES]
    qwen = [r for r in results if r.model.startswith("Qwen2.5-Coder-0.5B")]
    assert qwen and qwen[0].dtype == "bfloat16"
    assert qwen[0].model_fingerprint == h.hexdigest()
