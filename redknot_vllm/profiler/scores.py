"""The profiler's data: per-(layer, KV head) scores, how they are stored and read back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from redknot_vllm.errors import RedKnotError
from redknot_vllm.head_config import HeadConfig

SCORE_NAMES: tuple[str, ...] = ("prefix_shift", "edge_mass", "retrieval", "edge_mass_long",
                                 "retrieval_long")
"""The last two exist only for a long-context profile (:func:`profile_long`)."""
DECIMALS = 6
"""Scores are rounded so that re-classifying from the JSON equals classifying in memory."""
CLASSIFY_PARAMS = ("global_fraction", "window", "sink", "weights", "profiled_sink",
                   "tail_full_tokens", "dense_prefix_layers")
"""Provenance parameters that belong to classification, not to profiling."""

Matrix = list[list[float]]


class ProfileError(RedKnotError, ValueError):
    """A profiling or classification argument that cannot work; the message names it."""


@dataclass
class ProfileScores:
    """Per-(layer, KV head) scores of one profiling run, each in [0, 1]."""

    num_layers: int
    num_kv_heads: int
    prefix_shift: Matrix
    """``[L][H]`` attention-map change when an unrelated prefix is prepended."""
    edge_mass: dict[int, Matrix]
    """Window -> ``[L][H]`` attention mass a local head with that window would drop."""
    retrieval: Matrix
    """``[L][H]`` attention mass on the needle while the answer is produced."""
    windows: tuple[int, ...]
    sink: int
    params: dict[str, Any] = field(default_factory=dict)
    """Profiling parameters (max_tokens, n_texts, n_retrieval, seed, calibration, ...)."""
    model_fingerprint: str = ""
    model: str = ""
    edge_mass_long: dict[int, Matrix] = field(default_factory=dict)
    """Long context: window -> ``[L][H]`` mass sampled query rows put outside sink + window."""
    retrieval_long: Matrix | None = None
    """Long context: mass the answer rows put on the target needle among distractors."""
    long_params: dict[str, Any] = field(default_factory=dict)

    def score_matrices(self, window: int) -> dict[str, Matrix]:
        """The scores classification combines at ``window`` (long ones when profiled)."""
        out = {"prefix_shift": self.prefix_shift, "edge_mass": self.edge_mass[window],
               "retrieval": self.retrieval}
        if window in self.edge_mass_long:
            out["edge_mass_long"] = self.edge_mass_long[window]
        if self.retrieval_long is not None:
            out["retrieval_long"] = self.retrieval_long
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "prefix_shift": self.prefix_shift,
            "edge_mass": {str(w): m for w, m in sorted(self.edge_mass.items())},
            "retrieval": self.retrieval,
            "windows": list(self.windows),
            "sink": self.sink,
            "params": self.params,
            "model_fingerprint": self.model_fingerprint,
            "model": self.model,
            **self._long_dict(),
        }

    def _long_dict(self) -> dict[str, Any]:
        if not self.edge_mass_long and self.retrieval_long is None:
            return {}
        return {"edge_mass_long": {str(w): m for w, m in sorted(self.edge_mass_long.items())},
                "retrieval_long": self.retrieval_long, "long_params": self.long_params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileScores:
        return cls(
            num_layers=int(d["num_layers"]),
            num_kv_heads=int(d["num_kv_heads"]),
            prefix_shift=d["prefix_shift"],
            edge_mass={int(w): m for w, m in d["edge_mass"].items()},
            retrieval=d["retrieval"],
            windows=tuple(int(w) for w in d["windows"]),
            sink=int(d["sink"]),
            params=dict(d.get("params", {})),
            model_fingerprint=d.get("model_fingerprint", ""),
            model=d.get("model", ""),
            edge_mass_long={int(w): m for w, m in (d.get("edge_mass_long") or {}).items()},
            retrieval_long=d.get("retrieval_long"),
            long_params=dict(d.get("long_params") or {}),
        )

    @classmethod
    def from_head_config_json(cls, path: str | Path) -> ProfileScores:
        """Read the scores back from a head config written by :func:`profile`."""
        hc = HeadConfig.from_json(path)
        meta = hc.info.get("profiling_meta")
        prov = hc.info.get("provenance")
        if not isinstance(meta, dict) or "scores" not in meta or not isinstance(prov, dict):
            raise ProfileError(f"{path} has no profiling_meta.scores / provenance; it was not "
                               "written by `redknot profile`, so there is nothing to re-classify")
        s = meta["scores"]
        params = {k: v for k, v in prov.get("parameters", {}).items()
                  if k not in CLASSIFY_PARAMS}
        params["sink"] = int(meta["sink"])
        edge = {int(w): m for w, m in s["edge_mass"].items()}
        return cls(
            num_layers=hc.num_layers,
            num_kv_heads=hc.num_kv_heads,
            prefix_shift=s["prefix_shift"],
            edge_mass=edge,
            retrieval=s["retrieval"],
            windows=tuple(sorted(edge)),
            sink=int(meta["sink"]),
            params=params,
            model_fingerprint=prov.get("model_fingerprint", ""),
            model=prov.get("model", ""),
            edge_mass_long={int(w): m for w, m in (s.get("edge_mass_long") or {}).items()},
            retrieval_long=s.get("retrieval_long"),
            long_params=dict(meta.get("long_params") or {}),
        )


def load_scores(path: str | Path) -> ProfileScores:
    """Scores stored in a profiled head config (see :meth:`ProfileScores.from_head_config_json`)."""
    return ProfileScores.from_head_config_json(path)


def to_matrix(t: torch.Tensor) -> Matrix:
    """A ``[L, H]`` tensor as nested lists rounded to :data:`DECIMALS`."""
    return [[round(float(x), DECIMALS) for x in row] for row in t.tolist()]
