"""The model registry: GGUF chunks found in installed packages, in order, and verified."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from redknot_vllm import registry
from redknot_vllm.registry import ModelRegistryError, ModelSpec, gguf_parts, verify


@pytest.fixture
def chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    """Two installed packages holding three chunks of a fake GGUF."""
    data = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 5]
    for pkg, files in (("rk_fake_part1", data[:2]), ("rk_fake_part2", data[2:])):
        d = tmp_path / pkg / "data"
        d.mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
        for i, b in enumerate(files):
            (d / f"part{i + 1:02d}.bin").write_bytes(b)
    monkeypatch.syspath_prepend(str(tmp_path))
    whole = b"".join(data)
    return ModelSpec(name="fake", hf_name="Fake", packages=("rk_fake_part1", "rk_fake_part2"),
                     pattern="data/part*.bin", pip="pip install fake-part1 fake-part2",
                     sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))


def test_chunks_are_concatenated_in_package_order(chunked: ModelSpec) -> None:
    parts = gguf_parts(chunked)
    assert [p.parent.parent.name + "/" + p.name for p in parts] == [
        "rk_fake_part1/part01.bin", "rk_fake_part1/part02.bin", "rk_fake_part2/part01.bin"]
    assert verify(chunked, parts) == chunked.sha256


def test_wrong_or_missing_gguf_is_a_clear_error(chunked: ModelSpec) -> None:
    parts = gguf_parts(chunked)
    bad = ModelSpec(**{**chunked.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelRegistryError, match=r"expected 0000.*pip install fake-part1"):
        verify(bad, parts)
    with pytest.raises(ModelRegistryError, match="add up to 26 bytes, expected 23"):
        verify(ModelSpec(**{**chunked.__dict__, "size": 23}), parts)
    gone = ModelSpec(**{**chunked.__dict__, "packages": ("rk_fake_part1", "rk_fake_part9")})
    with pytest.raises(ModelRegistryError, match="rk-fake-part9"):
        gguf_parts(gone)
    with pytest.raises(ModelRegistryError, match="unknown model 'nope'"):
        registry.model_path("nope")


def test_folders_pass_through_and_names_are_known(tmp_path: Path) -> None:
    assert registry.resolve_model(str(tmp_path)) == str(tmp_path)
    assert {"smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(registry.MODELS)
    q = registry.MODELS["qwen2.5-coder-0.5b"]
    assert q.size == 491_400_064 and q.sha256 and q.sha256.startswith("1d9614638d18")
    assert "rk_fake_part1" not in sys.modules
