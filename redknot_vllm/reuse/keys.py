"""An engine's reuse setup: its options and the key space its segments live in."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redknot_vllm import envs
from redknot_vllm.config import RedKnotConfig, RedKnotConfigError, ReuseConfig
from redknot_vllm.dims import ModelDims
from redknot_vllm.fingerprint import FingerprintError, model_fingerprint
from redknot_vllm.kv_store import SegmentKey


@dataclass(frozen=True)
class ReuseSetup:
    """Everything both halves of reuse derive from the engine's configuration, once."""

    cfg: ReuseConfig
    key_fields: dict[str, str]
    """:class:`SegmentKey` fields other than the tokens: model fingerprint, head-config
    hash, tokenizer, KV layout, store context."""
    bos_token_id: int | None
    store_dir: Path
    """The disk tier (``reuse.store_dir`` or ``$VLLM_REDKNOT_CACHE_DIR/kv-segments``)."""

    def key(self, token_ids: Sequence[int]) -> SegmentKey:
        """The key of a token sequence stored by this engine."""
        ids = tuple(int(t) for t in token_ids)
        return SegmentKey(bos=bool(ids) and ids[0] == self.bos_token_id, token_ids=ids,
                          **self.key_fields)

    def matches(self, key: SegmentKey) -> bool:
        """Whether a stored key belongs to this engine's key space."""
        return all(getattr(key, k) == v for k, v in self.key_fields.items())


def store_dir(cfg: ReuseConfig) -> Path:
    """Where an engine's segments live on disk (``~`` expanded)."""
    return Path(cfg.store_dir).expanduser() if cfg.store_dir else envs.cache_dir() / "kv-segments"


def check_store_dir(path: Path) -> None:
    """Create the store folder if needed; a path that cannot be one is an error naming
    ``reuse.store_dir``."""
    where = f"reuse.store_dir {path}"
    if path.exists() and not path.is_dir():
        raise RedKnotConfigError(f"{where} is not a folder; point reuse.store_dir at a folder "
                                 "(it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RedKnotConfigError(f"{where} cannot be created ({e.strerror}); point "
                                 "reuse.store_dir at a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RedKnotConfigError(f"{where} is not writable by this user; point "
                                 "reuse.store_dir at a writable folder")


def reuse_setup(vllm_config: Any) -> ReuseSetup | None:
    """An engine's reuse setup, or None when reuse is off; validates what reuse needs."""
    cfg = RedKnotConfig.from_additional_config(vllm_config.additional_config)
    if cfg is None or cfg.reuse is None:
        return None
    if cfg.head_config is None:
        raise RedKnotConfigError("reuse needs a head config (additional_config['redknot']"
                                 "['head_config']); an all-global one reuses under dense "
                                 "attention")
    par = vllm_config.parallel_config
    if par.tensor_parallel_size * par.pipeline_parallel_size != 1:
        raise RedKnotConfigError(
            "RedKnot KV reuse runs with tensor_parallel_size=1 and pipeline_parallel_size=1; "
            f"got {par.tensor_parallel_size} and {par.pipeline_parallel_size}")
    mc = vllm_config.model_config
    dtype = str(mc.dtype).removeprefix("torch.")
    if str(vllm_config.load_config.load_format) == "dummy":
        # random weights (speed runs) are a function of the config and the seed
        blob = json.dumps([mc.hf_config.to_dict(), dtype, mc.seed], sort_keys=True, default=str)
        fp = "dummy-" + hashlib.sha256(blob.encode()).hexdigest()
    else:
        try:
            fp = model_fingerprint(mc.model, dtype)
        except FingerprintError as e:
            raise RedKnotConfigError(f"KV reuse keys segments by the model's weights: {e}"
                                     ) from e
    hf = mc.hf_text_config
    folder = store_dir(cfg.reuse)
    check_store_dir(folder)
    return ReuseSetup(
        cfg=cfg.reuse,
        key_fields={
            "model_fingerprint": fp,
            "head_config_hash": cfg.head_config.content_hash(),
            "tokenizer": f"{Path(str(mc.tokenizer)).name}|{mc.tokenizer_mode}",
            # SegPaged orders each layer's heads global first, then local: its caches (and
            # so its segments) are in another head order than an unsplit engine's
            "layout": ModelDims.from_hf_config(hf).layout(dtype)
                      + ("|segpaged" if cfg.segpaged else ""),
            "context": cfg.reuse.context_hash(),
        },
        bos_token_id=getattr(hf, "bos_token_id", None),
        store_dir=folder,
    )
