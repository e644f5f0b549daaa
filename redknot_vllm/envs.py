"""The plugin's environment variables, declared once. Defaults only, never algorithm knobs.

The ``VLLM_`` prefix is deliberate: vLLM copies ``VLLM_*`` variables into Ray workers.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``VLLM_REDKNOT_CACHE_DIR``: root of the plugin's caches (converted models, ...).

    Default ``~/.cache/redknot``.
    """
    return Path(os.environ.get("VLLM_REDKNOT_CACHE_DIR", "~/.cache/redknot")).expanduser()


def stats_log_interval_s() -> float:
    """``VLLM_REDKNOT_STATS_INTERVAL``: seconds between aggregate RedKnot log lines when
    per-request accounting is off (no RedKnot connector). Default 10."""
    return float(os.environ.get("VLLM_REDKNOT_STATS_INTERVAL", "10"))
