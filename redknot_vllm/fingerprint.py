"""Content addresses of a local model: what RedKnot keys its caches and gates on.

* :func:`model_fingerprint` (KV segments, profiles): a sha256 over the bytes of the weight
  files (``*.safetensors``; ``*.bin`` is refused: never pickle), ``config.json``, the
  tokenizer files and the dtype the engine will run in. Any byte counts, so the same model
  converted by two transformers versions (whose ``config.json`` and tokenizer files are
  written differently) has two fingerprints.
* :func:`weights_fingerprint` (quality gates): a sha256 over every weight tensor's name,
  dtype, shape and values, and the dtype; file headers, metadata, tensor order, config and
  tokenizer files do not count. The Qwen2.5-Coder-0.5B GGUF converted on the H200 host and
  on the CPU machine has 291 identical tensors (``benchmarks/results/raw/
  conversion-digests-qwen05.json``) and different file fingerprints, so a gate passed on
  one host holds on the other.

Hashing 270 MB takes about a second; results are memoised on disk by (path, size, mtime)
per file, so a later call only re-reads files that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from redknot_vllm import envs
from redknot_vllm.errors import RedKnotError
from redknot_vllm.fsutil import atomic_write

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                    "generation_config.json")


class FingerprintError(RedKnotError, ValueError):
    """The model folder cannot be fingerprinted."""


def _file_digest(path: Path, memo: dict[str, str]) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def model_fingerprint(model_dir: str | Path, dtype: str = "auto") -> str:
    """sha256 (hex) of a local HF model folder's weights, config, tokenizer and ``dtype``."""
    root = Path(model_dir)
    weights = _weight_files(root)
    h = hashlib.sha256(f"redknot-fingerprint-v1|dtype={dtype}".encode())
    files = [root / "config.json", *weights,
             *(root / n for n in _TOKENIZER_FILES if (root / n).is_file())]
    with _memo() as memo:
        for p in files:
            h.update(f"|{p.name}={_file_digest(p, memo)}".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _memo() -> Iterator[dict[str, str]]:
    """The on-disk memo of file digests, written back if the block changed it."""
    memo_path = envs.cache_dir() / "fingerprints.json"
    try:
        memo: dict[str, str] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    before = dict(memo)
    yield memo
    if memo != before:
        atomic_write(memo_path, json.dumps(memo))


def _weight_files(root: Path) -> list[Path]:
    if not (root / "config.json").is_file():
        raise FingerprintError(f"{root} has no config.json; RedKnot fingerprints local HF "
                               "model folders only")
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in root.glob("*.bin"))
        hint = (f" (it has {pickled}: convert them to safetensors; RedKnot never loads "
                "pickle)") if pickled else ""
        raise FingerprintError(f"{root} has no *.safetensors weights{hint}")
    return weights


def _file_tensor_digests(path: Path) -> dict[str, str]:
    import torch
    from safetensors import safe_open

    out: dict[str, str] = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name).contiguous()
            h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            out[name] = h.hexdigest()
    return out


def tensor_digests(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every weight tensor's dtype, shape and bytes, by name (safetensors files
    only): two conversions of one source hold the same weights exactly when these agree,
    whatever their files' headers, metadata or tensor order."""
    out: dict[str, str] = {}
    for p in _weight_files(Path(model_dir)):
        out.update(_file_tensor_digests(p))
    return out


def weights_fingerprint(model_dir: str | Path, dtype: str = "auto") -> str:
    """sha256 (hex) over the weight tensors' names, dtypes, shapes and values and ``dtype``
    (see the module docstring: what a quality gate is keyed on)."""
    digests: dict[str, str] = {}
    with _memo() as memo:
        for p in _weight_files(Path(model_dir)):
            st = p.stat()
            key = f"tensors|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            if key not in memo:
                memo[key] = json.dumps(_file_tensor_digests(p), sort_keys=True)
            digests.update(json.loads(memo[key]))
    h = hashlib.sha256(f"redknot-weights-v1|dtype={dtype}".encode())
    for name in sorted(digests):
        h.update(f"|{name}={digests[name]}".encode())
    return h.hexdigest()
