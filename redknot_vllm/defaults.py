"""The shipped quality defaults: head configs made by the tools, measured, and gated.

A head config *is* a shipped quality default when its content hash equals one of the files
named in :data:`QUALITY_DEFAULTS` (so a copy, an inline dict or the file itself all count,
and an edited copy does not). Engines that use one require its quality gate by default
(:mod:`redknot_vllm.gate`); the passed gate results ship beside them in
``head_class/gates/``. The speed-shape configs in ``head_class/`` (random-weight models)
are not quality defaults.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

from redknot_vllm.head_config import HeadConfig

QUALITY_DEFAULTS = ("smollm2-135m-instruct.json", "qwen2.5-coder-0.5b-instruct.json")


def shipped_dir() -> Path:
    """The installed ``head_class`` folder."""
    return Path(str(importlib.resources.files("redknot_vllm.head_class")))


def shipped_gates_dir() -> Path:
    """Passed gate results of the quality defaults, shipped with the package."""
    return shipped_dir() / "gates"


@functools.cache
def _default_hashes() -> dict[str, str]:
    return {HeadConfig.from_json(str(shipped_dir() / name)).content_hash(): name
            for name in QUALITY_DEFAULTS}


def quality_default_name(hc: HeadConfig | None) -> str | None:
    """The shipped quality default ``hc`` is (its file name), or None."""
    return None if hc is None else _default_hashes().get(hc.content_hash())
