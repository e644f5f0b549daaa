"""Quality gate: a short A/B of a RedKnot configuration against dense vLLM on a model.

``redknot gate MODEL --head-config F [--sparse-ffn F]`` runs a few synthetic long-context
tasks (:mod:`redknot_vllm.quality`) through stock vLLM and through RedKnot, and refuses the
configuration when RedKnot's accuracy falls below the bar (by default 98% of dense on
average and 95% in every cell). The result is cached under
``<cache>/gates/<key>.json``, where the key is a sha256 over the model fingerprint
(weights, tokenizer, dtype), the head-config hash and the sparse-FFN hash.

An engine started with ``require_gate`` (``engine_args(..., require_gate=True)`` or
``"require_gate": true`` in ``additional_config["redknot"]``) refuses to start unless a
passed gate result exists for exactly that model, dtype and configuration.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redknot_vllm import envs
from redknot_vllm.config import RedKnotConfig, RedKnotConfigError
from redknot_vllm.fingerprint import model_fingerprint

logger = logging.getLogger(__name__)

GATE_SEED = 20261126
"""The gate's task seed: neither the sweep's tuning seed nor the reporting seed."""
DEFAULT_TASKS = ("niah_multikey", "multidoc_qa", "niah_single")
DEFAULT_LENGTHS = (2048,)
DEFAULT_N = 16


class GateRefused(RuntimeError):
    """The configuration did not pass the quality gate."""


def _config_hashes(cfg: RedKnotConfig) -> tuple[str, str]:
    head = cfg.head_config.content_hash() if cfg.head_config is not None else "none"
    ffn = cfg.sparse_ffn.content_hash() if cfg.sparse_ffn is not None else "none"
    return head, ffn


def gate_key(fingerprint: str, cfg: RedKnotConfig) -> str:
    """Cache key of a gate result: model fingerprint and both config hashes."""
    head, ffn = _config_hashes(cfg)
    return hashlib.sha256(f"gate-v1|{fingerprint}|{head}|{ffn}".encode()).hexdigest()


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
                f"{_fmt(s['avg_ratio'])} (bar {s['bar']['avg_ratio']}), worst cell "
                f"{worst['task']}@{worst['tokens']} {_fmt(worst['ratio'])} (bar "
                f"{s['bar']['min_cell_ratio']}); n={self.params['n']} per cell")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
                       (redknot_llm, lambda: engine_args(model, head_config=cfg.head_config,
                                                         sparse_ffn=cfg.sparse_ffn, **kw))):
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
    fp = model_fingerprint(model, dtype or "auto")
    head, ffn = _config_hashes(cfg)
    result = GateResult(
        passed=summary["meets_bar"], model=Path(model).name, model_fingerprint=fp,
        dtype=dtype or "auto", head_config_hash=head, sparse_ffn_hash=ffn, summary=summary,
        cells=[c.as_dict() for c in cells],
        params={"tasks": list(tasks), "lengths": list(lengths), "n": n, "seed": seed,
                "bar": asdict(bar)})
    _write_atomic(gate_path(gate_key(fp, cfg)), json.dumps(asdict(result), indent=1))
    logger.warning("%s", result.message())
    return result


def lookup(model: str, cfg: RedKnotConfig, dtype: str) -> GateResult | None:
    """The cached gate result for this model, dtype and configuration, if any."""
    fp = model_fingerprint(model, dtype)
    path = gate_path(gate_key(fp, cfg))
    try:
        raw = json.loads(path.read_text())
        result = GateResult(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        logger.warning("Ignoring unreadable gate result %s: %s", path, e)
        return None
    head, ffn = _config_hashes(cfg)
    if (result.model_fingerprint, result.head_config_hash, result.sparse_ffn_hash) != (
            fp, head, ffn):
        logger.warning("Ignoring gate result %s: it is for another model or config", path)
        return None
    return result


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
            f"run `{cmd}` first, or drop require_gate")
    if not result.passed:
        raise GateRefused(f"require_gate: this configuration failed its gate on "
                          f"{result.date}: {result.message()}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``redknot gate``: exit 0 when the configuration passes, 1 when it is refused."""
    import argparse

    from redknot_vllm import quality
    from redknot_vllm.cli import resolve_model

    p = argparse.ArgumentParser(prog="redknot gate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="local HF model folder, or `smollm2`")
    p.add_argument("--head-config", required=True, help="head-class JSON")
    p.add_argument("--sparse-ffn", default=None, help="sparse-FFN JSON")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated, from {','.join(quality.TASKS)}")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--n", type=int, default=DEFAULT_N, help="cases per (task, length)")
    p.add_argument("--seed", type=int, default=GATE_SEED)
    p.add_argument("--avg-bar", type=float, default=quality.Bar.avg_ratio)
    p.add_argument("--cell-bar", type=float, default=quality.Bar.min_cell_ratio)
    p.add_argument("--dtype", default="auto", help="engine dtype (part of the cache key)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's; on CPU it is the share of host RAM (default 0.3 there)")
    a = p.parse_args(argv)
    model = resolve_model(a.model)
    cfg = RedKnotConfig.from_additional_config(
        {"redknot": {"head_config": a.head_config, "sparse_ffn": a.sparse_ffn}})
    assert cfg is not None
    try:
        lengths = [int(x) for x in a.lengths.split(",") if x]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {a.lengths!r}")
    kw: dict[str, Any] = {"dtype": a.dtype, "enforce_eager": True, "seed": 0,
                          "max_num_batched_tokens": max(lengths)}
    import torch

    if a.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = a.gpu_memory_utilization
    elif not torch.cuda.is_available():
        kw["gpu_memory_utilization"] = 0.3
    result = run_gate(model, cfg, tasks=[t for t in a.tasks.split(",") if t], lengths=lengths,
                      n=a.n, seed=a.seed, bar=quality.Bar(a.avg_bar, a.cell_bar),
                      engine_kwargs=kw)
    print(result.message())
    for c in result.cells:
        print(f"  {c['task']:<18} {c['tokens']:>6}  dense {c['dense_acc']:.2f}  redknot "
              f"{c['redknot_acc']:.2f}  ratio {_fmt(c['ratio'])}  agreement "
              f"{c['agreement']:.2f}")
    print(f"cached at {gate_path(gate_key(result.model_fingerprint, cfg))}")
    return 0 if result.passed else 1
