"""SegPagedAttention on the GPU: dense vLLM vs RedKnot vs RedKnot + SegPaged, same run.

    python benchmarks/segpaged.py --out benchmarks/results/segpaged-h200.json

The random-weight Llama-3.1-8B shape of ``ttft.py`` (``load_format="dummy"``), the head
config of 1 global KV head in 8 per layer, W=4096, sink 4
(``head_class/llama-3.1-8b.shape-g1of8-w4096.json``). Every engine gets the same engine
arguments apart from the RedKnot switches, each in its own subprocess with its engine core
in that process (the benchmark reads vLLM's scheduler and KV-cache manager).

Per engine:

* **capacity**: vLLM's own figure (``get_max_concurrency_for_kv_cache_config``) for
  sessions of ``--context`` tokens, from the engine's KV-cache config, with the engine's
  chunk size (``max_num_batched_tokens``: a sliding-window group reserves its window plus
  one chunk in flight per request, vLLM's own rule);
* **TTFT** at 16K / 32K / 64K: wall clock of ``generate()`` with ``max_tokens=1`` after a
  same-length warm-up;
* **decode at batch 32 x 32K** (dense and SegPaged): 32 prompts submitted at once, each
  generating long enough to outlast the admission of all (``ceil(32K / chunk)`` steps per
  prompt) with prompts shortened by as much, so no session passes 32K; the engine is
  stepped by hand until ``--measure`` consecutive steps run the same requests, all past
  their prompt; tok/s over those steps, with the batch and the requests still waiting
  (dense cannot hold 32 such sessions: its decode runs at the batch it holds); then
  ``--profile-steps`` steps under the torch profiler, and the rest is aborted;
* **sessions actually held**: ``--sessions`` prompts (default: 10% over the pool's
  estimate of decoding sessions, :func:`held_estimate`) the same way, 8 steady steps; the
  number running once steady, those waiting, and the preemptions seen.

Finished engines' results wait in ``--workdir`` (the same command continues where a cut call
stopped).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ttft import env_info, model_dir  # noqa: E402

ENGINES = ("dense", "redknot", "segpaged")
HEAD_CONFIG = "head_class/llama-3.1-8b.shape-g1of8-w4096.json"
LENGTHS = (16384, 32768, 65536)
ENGINE = {"load_format": "dummy", "max_model_len": 65536 + 512, "max_num_seqs": 256,
          "gpu_memory_utilization": 0.9, "skip_tokenizer_init": True, "seed": 0}
VOCAB = 49152


def _scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def capacity(llm: Any, context: int) -> dict[str, Any]:
    """vLLM's concurrency figure for sessions of ``context`` tokens, and its inputs."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    vc = llm.llm_engine.vllm_config
    kvc = _scheduler(llm).kv_cache_config
    at = copy.copy(vc)
    # the figure vLLM logs is for max_model_len (64.5K here); the same rule at `context`
    object.__setattr__(at, "model_config", copy.copy(vc.model_config))
    object.__setattr__(at.model_config, "max_model_len", context)
    groups = []
    for g in kvc.kv_cache_groups:
        s = g.kv_cache_spec
        groups.append({"spec": type(s).__name__, "layers": len(g.layer_names),
                       "num_kv_heads": s.num_kv_heads, "block_size": s.block_size,
                       "page_size_bytes": s.page_size_bytes,
                       "blocks_per_session": math.ceil(s.max_memory_usage_bytes(at)
                                                       / s.page_size_bytes),
                       "window": getattr(s, "sliding_window", None),
                       "sink": getattr(s, "num_sink_tokens", None)})
    # vLLM's rule with other chunk sizes on this engine's pool (computed, not run): a
    # sliding-window group reserves window + the tokens in flight per request
    by_chunk = {}
    for chunk in (256, 512, 1024, 2048, 4096, 8192):
        alt = copy.copy(at)
        object.__setattr__(alt, "scheduler_config", copy.copy(vc.scheduler_config))
        object.__setattr__(alt.scheduler_config, "max_num_batched_tokens", chunk)
        by_chunk[str(chunk)] = get_max_concurrency_for_kv_cache_config(alt, kvc)
    return {"context": context, "num_blocks": kvc.num_blocks,
            "max_concurrency_by_chunk_computed": by_chunk,
            "max_in_flight_tokens": at.max_in_flight_tokens,
            "async_scheduling": vc.scheduler_config.async_scheduling,
            "kv_cache_bytes": sum(t.size for t in kvc.kv_cache_tensors),
            "max_concurrency": get_max_concurrency_for_kv_cache_config(at, kvc),
            "max_concurrency_at_max_model_len": vc.cache_config.kv_cache_max_concurrency,
            "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
            "groups": groups}


def run_batch(llm: Any, prompts: list[list[int]], max_tokens: int, tag: str,
              measure_steps: int, profile_steps: int = 0) -> dict[str, Any]:
    """Submit every prompt at once and step the engine by hand until the batch is steady.

    Steady: ``measure_steps`` consecutive looks at the scheduler find the same requests
    running, every one past its prompt (all admitted, or as many as the KV pool admits
    while the rest wait). Their tokens gained over that wall time is the decode speed
    (exact with vLLM's asynchronous scheduling too, which overlaps two steps per call);
    then, optionally, ``profile_steps`` more steps under the torch profiler, and every
    request still unfinished is aborted. ``max_tokens`` must outlast admission (each
    prompt takes ``ceil(len / chunk)`` steps), or early requests finish before the last
    are admitted.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, sched = llm.llm_engine, _scheduler(llm)
    sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0,
                        ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, TokensPrompt(prompt_token_ids=p), sp)
    peak, preempted, last, steady, steps = 0, set(), None, None, 0
    acc = [0, 0.0, 0]  # tokens, seconds, looks of the current steady run
    finished_early = 0
    t_start = time.perf_counter()
    while engine.has_unfinished_requests():
        now = time.perf_counter()
        running = list(sched.running)
        decoding = [r for r in running if r.num_computed_tokens >= r.num_prompt_tokens]
        peak = max(peak, len(decoding))
        for r in [*running, *sched.waiting]:
            if getattr(r, "num_preemptions", 0):
                preempted.add(r.request_id)
        look = None
        if running and len(decoding) == len(running):
            look = (frozenset(r.request_id for r in running),
                    sum(r.num_output_tokens for r in running), now)
            if last is not None and last[0] == look[0]:
                acc = [acc[0] + look[1] - last[1], acc[1] + look[2] - last[2], acc[2] + 1]
            else:
                acc = [0, 0.0, 0]
        last = look
        if acc[2] >= measure_steps:
            steady = {"batch": len(running), "waiting": len(sched.waiting),
                      "tokens": acc[0], "seconds": acc[1], "looks": acc[2],
                      "tok_s": acc[0] / acc[1] if acc[1] else None,
                      "mean_context": statistics.mean(r.num_tokens for r in running)}
            break
        for out in engine.step():
            finished_early += bool(getattr(out, "finished", False))
        steps += 1
    profile = None
    if steady is not None and profile_steps:
        import torch
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(profile_steps):
                engine.step()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        profile = {"steps": profile_steps,
                   "by_cuda_time": ka.table(sort_by="self_cuda_time_total", row_limit=25),
                   "by_cpu_time": ka.table(sort_by="self_cpu_time_total", row_limit=25)}
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return {"requests": len(prompts), "prompt_tokens": len(prompts[0]),
            "max_tokens": max_tokens, "steps": steps,
            "wall_s": time.perf_counter() - t_start, "peak_decoding": peak,
            "finished_before_steady": finished_early,
            "preempted_requests": len(preempted), "steady": steady, "profile": profile}


def _max_tokens(context: int, chunk: int, n: int, measure: int) -> int:
    """New tokens that outlast the admission of ``n`` prompts of about ``context`` tokens
    in chunks of ``chunk`` and a measurement after it (prompts are ``context`` minus this,
    so no session grows past ``context``)."""
    return math.ceil(context / chunk) * n + 2 * measure + 64


def held_estimate(cap: dict[str, Any]) -> float:
    """Sessions of ``context`` tokens the pool holds once decoding: per group a full
    session (full attention), or a sink page + the window + the page being written."""
    per = 0
    for g in cap["groups"]:
        b = g["block_size"]
        if g["window"] is None:
            per += math.ceil(cap["context"] / b)
        else:
            per += math.ceil(g["sink"] / b) + math.ceil(g["window"] / b) + 1
    return cap["num_blocks"] / per


def smoke_model(workdir: Path) -> tuple[str, dict[str, Any]]:
    """The 8B shape's layer and head counts at tiny widths (CPU checks of the benchmarks),
    and the engine arguments that fit it."""
    from ttft import LLAMA8B

    tiny = workdir / "llama-8b-layout-tiny"
    tiny.mkdir(parents=True, exist_ok=True)
    (tiny / "config.json").write_text(json.dumps(dict(
        LLAMA8B, hidden_size=256, intermediate_size=512, num_attention_heads=8,
        head_dim=32, max_position_embeddings=8192)))
    return str(tiny), {"max_model_len": 4096, "kv_cache_memory_bytes": 512 << 20}


def child(args: argparse.Namespace) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from redknot_vllm import engine_args

    model = model_dir("llama8b", Path(args.workdir))
    kw = dict(ENGINE, max_num_batched_tokens=args.chunk, enforce_eager=args.enforce_eager)
    if args.smoke:  # the script's own check on CPU: 8B's layer and head counts, tiny widths
        model, extra = smoke_model(Path(args.workdir))
        kw = dict(kw, **extra)
        kw.pop("gpu_memory_utilization")
    if args.engine == "dense":
        kw = dict(kw, model=model)
    else:
        kw = engine_args(model, head_config=str(ROOT / HEAD_CONFIG), require_gate=False,
                         request_stats=False, segpaged=args.engine == "segpaged", **kw)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    # each engine's file carries its provenance: a parent cut off before assembling (the
    # H200 run of 8ec75a7) leaves only these
    out: dict[str, Any] = {
        **env_info(), "engine": args.engine,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "engine_start_s": time.perf_counter() - t0, "capacity": capacity(llm, args.context)}
    print(f"[segpaged] {args.engine}: vLLM's concurrency at {args.context} tokens "
          f"{out['capacity']['max_concurrency']:.2f}", flush=True)
    rng = random.Random(1234)  # the same prompts for every engine

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, VOCAB) for _ in range(n)]

    sp = SamplingParams(max_tokens=1, temperature=0)
    out["ttft_s"] = {}
    for n in args.lengths:
        llm.generate([TokensPrompt(prompt_token_ids=prompt(n))], sp, use_tqdm=False)
        times = []
        for _ in range(args.prompts):
            p = TokensPrompt(prompt_token_ids=prompt(n))
            t = time.perf_counter()
            llm.generate([p], sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        out["ttft_s"][str(n)] = times
        print(f"[segpaged] {args.engine} {n}: TTFT {statistics.median(times):.3f} s", flush=True)
    vc = llm.llm_engine.vllm_config
    cc = vc.compilation_config
    out["compilation"] = {"mode": str(getattr(cc, "mode", getattr(cc, "level", None))),
                          "cudagraph_mode": str(cc.cudagraph_mode),
                          "max_cudagraph_capture_size": max(cc.cudagraph_capture_sizes or [0])}
    if args.engine != "redknot":  # RedKnot without SegPaged decodes like dense
        m = _max_tokens(args.context, args.chunk, args.batch, args.measure)
        out["decode"] = run_batch(llm, [prompt(args.context - m) for _ in range(args.batch)],
                                  m, "decode", args.measure, args.profile_steps)
        # what a cut call would lose: the phases so far, beside the final file
        Path(args.json_out + ".partial").write_text(json.dumps(out))
        st = out["decode"]["steady"] or {}
        print(f"[segpaged] {args.engine} decode: {st.get('tok_s')} tok/s at batch "
              f"{st.get('batch')} ({st.get('waiting')} waiting)", flush=True)
        out["capacity"]["held_estimate"] = held_estimate(out["capacity"])
        n = args.sessions or math.ceil(out["capacity"]["held_estimate"] * 1.1) + 2
        m = _max_tokens(args.context, args.chunk, n, 8)
        out["sessions"] = run_batch(llm, [prompt(args.context - m) for _ in range(n)], m,
                                    "sessions", 8)
        st = out["sessions"]["steady"] or {}
        print(f"[segpaged] {args.engine} sessions: {st.get('batch')} held of {n} "
              f"({out['sessions']['preempted_requests']} preempted)", flush=True)
    Path(args.json_out).write_text(json.dumps(out))


def parent(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for engine in args.engines:
        js = work / f"segpaged-{engine}.json"
        if not js.exists():
            cmd = [sys.executable, __file__, "--child", "--engine", engine, "--json-out",
                   str(js), "--workdir", str(work), "--chunk", str(args.chunk), "--context",
                   str(args.context), "--batch", str(args.batch), "--prompts",
                   str(args.prompts), "--sessions", str(args.sessions), "--measure",
                   str(args.measure), "--profile-steps", str(args.profile_steps), "--lengths",
                   *map(str, args.lengths), *(["--enforce-eager"] if args.enforce_eager
                                             else []),
                   *(["--smoke"] if args.smoke else [])]
            rc = subprocess.run(cmd, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
                                ).returncode
            if rc != 0:
                print(f"[segpaged] {engine} failed (rc {rc})", flush=True)
                if not args.allow_partial:
                    sys.exit(rc)
                continue
        runs[engine] = json.loads(js.read_text())
    doc = assemble(args, runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("max_concurrency", "decode_tok_s", "ttft_median_s")}))


def assemble(args: argparse.Namespace, runs: dict[str, Any]) -> dict[str, Any]:
    def get(engine: str, *path: str) -> Any:
        v: Any = runs.get(engine)
        for p in path:
            v = None if v is None else v.get(p)
        return v

    med = {e: {n: statistics.median(t) for n, t in r["ttft_s"].items()}
           for e, r in runs.items()}
    # provenance from the engines' own files (the parent may assemble elsewhere, later)
    first = runs.get("segpaged") or next(iter(runs.values()))
    prov = {k: first.get(k) for k in ("device", "driver", "vllm", "torch", "commit", "date")}
    differ = sorted({k for r in runs.values() for k in ("device", "vllm", "commit")
                     if r.get(k) != first.get(k)})
    if differ:
        raise SystemExit(f"[segpaged] engine files disagree on {differ}: not one run")
    return {
        **prov,
        "assembled": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "model": "random-weight Llama-3.1-8B shape (benchmarks/ttft.py, load_format dummy)",
        "config": {"head_config": HEAD_CONFIG, "sparse_ffn": None, "engine": ENGINE,
                   "max_num_batched_tokens": args.chunk, "context": args.context,
                   "decode_batch": args.batch, "decode_measure_steps": args.measure,
                   "enforce_eager": args.enforce_eager, "prompts_per_length": args.prompts,
                   "engines": {"dense": "stock vLLM", "redknot": "RedKnot head classes",
                               "segpaged": "RedKnot head classes + SegPaged"}},
        "max_concurrency": {
            "dense": get("dense", "capacity", "max_concurrency"),
            "redknot": get("segpaged", "capacity", "max_concurrency"),
            "redknot_without_segpaged": get("redknot", "capacity", "max_concurrency"),
            "held_dense": get("dense", "sessions", "steady", "batch"),
            "held_redknot": get("segpaged", "sessions", "steady", "batch"),
            "held_estimate_dense": get("dense", "capacity", "held_estimate"),
            "held_estimate_redknot": get("segpaged", "capacity", "held_estimate")},
        "decode_tok_s": {
            "dense": get("dense", "decode", "steady", "tok_s"),
            "redknot": get("segpaged", "decode", "steady", "tok_s"),
            "batch_dense": get("dense", "decode", "steady", "batch"),
            "batch_redknot": get("segpaged", "decode", "steady", "batch"),
            "waiting_dense": get("dense", "decode", "steady", "waiting"),
            "waiting_redknot": get("segpaged", "decode", "steady", "waiting")},
        "ttft_median_s": med,
        # the layout: per prompt length, each engine's median TTFT (s)
        "ttft": {n: {e: m[n] for e, m in med.items() if n in m}
                 for n in sorted({n for m in med.values() for n in m}, key=int)},
        "quality": quality_cells(args.quality, args.quality_note),
        "runs": runs,
    }


def quality_cells(path: str | None, note: str | None = None) -> dict[str, Any] | None:
    """The harness's SegPaged cells (``benchmarks/quality.py report --segpaged``): per
    (task, length) RedKnot without and with SegPaged, dense beside them."""
    if not path:
        return None
    q = json.loads(Path(path).read_text())
    seg = q["segpaged"]
    dense = {(c["task"], c["tokens"]): c for c in seg["vs_dense"]["cells"]}
    return {"source": Path(path).name, "model": q["model"], "head_config":
            q["config"]["head_config"], "seed": q["seed"], "device": q["device"],
            "commit": q["commit"], "within_noise": seg["within_noise"],
            "noise_test": seg["noise_test"], "note": note,
            "cells": [{**c, "dense_acc": dense[(c["task"], c["tokens"])]["dense_acc"]}
                      for c in seg["vs_redknot"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/segpaged-h200.json"))
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--workdir", default="/tmp/rks")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--measure", type=int, default=64,
                    help="steady decode steps measured at the full batch")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="decode steps under the torch profiler after the measurement")
    ap.add_argument("--sessions", type=int, default=0,
                    help="0: 10%% over the pool's estimate of decoding sessions, + 2")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--allow-partial", action="store_true")
    ap.add_argument("--quality-note", default=None,
                    help="where the quality report's engine runs come from (seeded runs)")
    ap.add_argument("--quality", default=None,
                    help="the harness's SegPaged report (quality.py report --segpaged) to "
                         "include")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model of the 8B layout (CPU check of the script)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
