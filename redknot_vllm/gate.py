"""Quality gate: a short A/B of a RedKnot configuration against dense vLLM on a model.

``redknot gate MODEL --head-config F [--sparse-ffn F]`` runs a few synthetic long-context
tasks (:mod:`redknot_vllm.quality`) through stock vLLM and through RedKnot, and refuses the
configuration when RedKnot's accuracy falls below the bar (by default 98% of dense on
average and 95% in every cell). The result is cached under
``<cache>/gates/<key>.json``, where the key is a sha256 over the weights fingerprint
(every weight tensor's values and the dtype: the same model converted on another host
keys the same, see :func:`redknot_vllm.fingerprint.weights_fingerprint`), the head-config
hash and the sparse-FFN hash.

An engine started with ``require_gate`` refuses to start unless a passed gate result
exists for exactly that model, dtype and configuration, in the user's cache or among the
results shipped with the package (``head_class/gates/``). ``require_gate`` is on by
default when the head config is a shipped quality default
(:mod:`redknot_vllm.defaults`), off for a user's own config; both can be set explicitly
(``engine_args(..., require_gate=...)`` or ``"require_gate"`` in
``additional_config["redknot"]``), and turning it off for a shipped default is logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redknot_vllm import envs
from redknot_vllm.config import RedKnotConfig, RedKnotConfigError
from redknot_vllm.defaults import shipped_gates_dir
from redknot_vllm.errors import RedKnotError
from redknot_vllm.fingerprint import weights_fingerprint
from redknot_vllm.fsutil import atomic_write
from redknot_vllm.quality import fmt

logger = logging.getLogger(__name__)

GATE_SEED = 20261126
"""The gate's task seed: neither the sweep's tuning seed nor the reporting seed."""
DEFAULT_TASKS = ("niah_multikey", "multidoc_qa", "niah_single")
DEFAULT_LENGTHS = (2048,)
DEFAULT_N = 16


class GateRefused(RedKnotError, RuntimeError):
    """The configuration did not pass the quality gate."""


def _config_hashes(cfg: RedKnotConfig) -> tuple[str, str]:
    head = cfg.head_config.content_hash() if cfg.head_config is not None else "none"
    ffn = cfg.sparse_ffn.content_hash() if cfg.sparse_ffn is not None else "none"
    return head, ffn


def gate_key(fingerprint: str, cfg: RedKnotConfig) -> str:
    """Cache key of a gate result: model fingerprint and both config hashes."""
    head, ffn = _config_hashes(cfg)
    return hashlib.sha256(f"gate-v2|{fingerprint}|{head}|{ffn}".encode()).hexdigest()


def gate_path(key: str) -> Path:
    return envs.cache_dir() / "gates" / f"{key}.json"


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``float32``: the form the fingerprint is keyed on."""
    return str(dtype).removeprefix("torch.")


@dataclass
class GateResult:
    """A finished gate run, as cached on disk."""

    passed: bool
    model: str
    model_fingerprint: str
    dtype: str
    head_config_hash: str
    sparse_ffn_hash: str
    summary: dict[str, Any]
    cells: list[dict[str, Any]]
    params: dict[str, Any]
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    def message(self) -> str:
        s = self.summary
        verdict = "PASSED" if self.passed else "REFUSED"
        worst = min(self.cells, key=lambda c: c["ratio"] if c["ratio"] is not None else 9)
        return (f"RedKnot quality gate {verdict}: accuracy ratio RedKnot/dense average "
                f"{fmt(s['avg_ratio'])} (bar {s['bar']['avg_ratio']}), worst cell "
                f"{worst['task']}@{worst['tokens']} {fmt(worst['ratio'])} (bar "
                f"{s['bar']['min_cell_ratio']}); n={self.params['n']} per cell")


def run_gate(model: str, cfg: RedKnotConfig, *, tasks: Sequence[str] = DEFAULT_TASKS,
             lengths: Sequence[int] = DEFAULT_LENGTHS, n: int = DEFAULT_N,
             seed: int = GATE_SEED, bar: Any = None, engine_kwargs: dict[str, Any] | None = None,
             dense_llm: Any = None, redknot_llm: Any = None) -> GateResult:
    """Run the A/B, cache the result and return it (passed or not).

    ``dense_llm`` / ``redknot_llm`` reuse running engines (they must be stock vLLM and
    RedKnot with ``cfg`` on ``model``); otherwise each is started and shut down in turn.
    """
    from transformers import AutoTokenizer

    from redknot_vllm import quality
    from redknot_vllm.config import engine_args

    bar = bar or quality.Bar()
    if cfg.head_config is None:
        raise RedKnotConfigError("gate: head_config is required (a dense model needs no gate)")
    kw = dict(engine_kwargs or {})
    tok = AutoTokenizer.from_pretrained(model)
    cases = quality.make_cases(tok, tasks, lengths, n, seed)
    kw.setdefault("max_model_len", max(lengths))
    outcomes = []
    dtype = None
    for llm, build in ((dense_llm, lambda: dict(kw, model=model)),
                       # the engine under test runs ungated: this is its gate
                       (redknot_llm, lambda: engine_args(model, head_config=cfg.head_config,
                                                         sparse_ffn=cfg.sparse_ffn,
                                                         require_gate=False, **kw))):
        own = llm is None
        if own:
            from vllm import LLM

            llm = LLM(**build())
        try:
            dtype = dtype_name(llm.llm_engine.model_config.dtype)
            outcomes.append(quality.run_cases(llm, cases, redknot=len(outcomes) == 1))
        finally:
            if own:
                llm.llm_engine.engine_core.shutdown()
                del llm
    cells = quality.compare(outcomes[0], outcomes[1])
    summary = quality.summarize(cells, bar)
    fp = weights_fingerprint(model, dtype or "auto")
    head, ffn = _config_hashes(cfg)
    result = GateResult(
        passed=summary["meets_bar"], model=Path(model).name, model_fingerprint=fp,
        dtype=dtype or "auto", head_config_hash=head, sparse_ffn_hash=ffn, summary=summary,
        cells=[c.as_dict() for c in cells],
        params={"tasks": list(tasks), "lengths": list(lengths), "n": n, "seed": seed,
                "bar": asdict(bar)})
    atomic_write(gate_path(gate_key(fp, cfg)), json.dumps(asdict(result), indent=1))
    logger.warning("%s", result.message())
    return result


def lookup(model: str, cfg: RedKnotConfig, dtype: str) -> GateResult | None:
    """The gate result for this model, dtype and configuration, if any: the user's cache
    first (a gate run here), then the results shipped with the package."""
    fp = weights_fingerprint(model, dtype)
    key = gate_key(fp, cfg)
    head, ffn = _config_hashes(cfg)
    for path in (gate_path(key), shipped_gates_dir() / f"{key}.json"):
        try:
            result = GateResult(**json.loads(path.read_text()))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError) as e:
            logger.warning("Ignoring unreadable gate result %s: %s", path, e)
            continue
        if (result.model_fingerprint, result.head_config_hash, result.sparse_ffn_hash) != (
                fp, head, ffn):
            logger.warning("Ignoring gate result %s: it is for another model or config", path)
            continue
        return result
    return None


def require_passed(model: str, cfg: RedKnotConfig, dtype: Any) -> GateResult:
    """Raise :class:`GateRefused` unless a passed gate exists for exactly this setup."""
    name = dtype_name(dtype)
    if not (Path(model) / "config.json").is_file():
        raise GateRefused(f"require_gate: {model} is not a local model folder, so it cannot "
                          "be fingerprinted; gate a local copy")
    result = lookup(model, cfg, name)
    cmd = (f"redknot gate {model} --dtype {name} --head-config <file>"
           + (" --sparse-ffn <file>" if cfg.sparse_ffn is not None else ""))
    if result is None:
        raise GateRefused(
            f"require_gate: no quality-gate result for this model ({name}) and RedKnot "
            f"configuration (head {cfg.head_config.source if cfg.head_config else None}); "
            f"run `{cmd}` first, or pass require_gate=False (`--require-gate off`) to "
            "start without one")
    if not result.passed:
        raise GateRefused(f"require_gate: this configuration failed its gate on "
                          f"{result.date}: {result.message()}")
    return result
