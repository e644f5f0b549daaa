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


def segment_key_file() -> Path:
    """``VLLM_REDKNOT_SEGMENT_KEY``: the installation's secret for KV-segment checksums
    (created on first use, owner-only). Default ``~/.config/redknot/segment-key``; never
    inside a segment store."""
    return Path(os.environ.get("VLLM_REDKNOT_SEGMENT_KEY",
                               "~/.config/redknot/segment-key")).expanduser()


def debug() -> bool:
    """``VLLM_REDKNOT_DEBUG=1``: the ``redknot`` command shows tracebacks of configuration
    errors (by default it prints one line naming the option)."""
    return os.environ.get("VLLM_REDKNOT_DEBUG", "") not in ("", "0")


def attention_impl() -> str:
    """``VLLM_REDKNOT_ATTENTION``: ``auto`` (default: FA3 + Triton on CUDA, torch on CPU) or
    ``torch`` (the torch implementation on CUDA too: a diagnostic, to tell a kernel fault
    from the method's own loss; slow)."""
    v = os.environ.get("VLLM_REDKNOT_ATTENTION", "auto").strip().lower() or "auto"
    if v not in ("auto", "torch"):
        raise ValueError(f"VLLM_REDKNOT_ATTENTION={v!r}: expected 'auto' or 'torch'")
    return v


def segpaged_decode_graphs() -> bool:
    """``VLLM_REDKNOT_SEGPAGED_DECODE_GRAPHS=0``: SegPaged's local heads decode eagerly
    between piecewise graphs instead of inside vLLM's full decode graphs (a diagnostic, to
    tell a graph fault from the kernels'). Default on."""
    return os.environ.get("VLLM_REDKNOT_SEGPAGED_DECODE_GRAPHS", "1") not in ("0", "")
