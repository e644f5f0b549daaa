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
* **decode at batch 32 x 32K** (dense and SegPaged): 32 prompts of ``--context - 256``
  tokens, 256 new tokens each, the engine stepped by hand; a step counts as decode when no
  running request still has prompt left; tok/s over those steps, with the batch they ran at
  (dense may not hold 32 such sessions: then its decode runs at the batch it holds and the
  rest wait);
* **sessions actually held**: ``--sessions`` (default: vLLM's figure + 25%, at least +4)
  prompts of the same length, 16 new tokens each, all submitted at once; the peak number of
  requests running with their prompt complete, and the preemptions seen.

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
NEW_TOKENS = 256
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


def run_batch(llm: Any, prompts: list[list[int]], new_tokens: int,
              tag: str) -> dict[str, Any]:
    """Submit every prompt at once and step the engine by hand until all finish.

    Decode speed: between two consecutive looks at the scheduler that both find the same
    requests running, all past their prompt, the tokens they gained over the wall time
    (exact with vLLM's asynchronous scheduling too, which overlaps two steps per call).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, sched = llm.llm_engine, _scheduler(llm)
    sp = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0,
                        ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=p), sp)
    by_batch: dict[int, list[float]] = {}  # batch -> [tokens, seconds]
    peak, preempted, last = 0, set(), None
    t_start = time.perf_counter()
    while engine.has_unfinished_requests():
        now = time.perf_counter()
        running = list(sched.running)
        decoding = [r for r in running if r.num_computed_tokens >= r.num_prompt_tokens]
        peak = max(peak, len(decoding))
        for r in sched.waiting:
            if getattr(r, "num_preemptions", 0):
                preempted.add(r.request_id)
        look = None
        if running and len(decoding) == len(running):
            look = (frozenset(r.request_id for r in running),
                    sum(r.num_output_tokens for r in running), now)
            if last is not None and last[0] == look[0]:
                acc = by_batch.setdefault(len(running), [0.0, 0.0])
                acc[0] += look[1] - last[1]
                acc[1] += look[2] - last[2]
        last = look
        engine.step()
    wall = time.perf_counter() - t_start
    top = max(by_batch) if by_batch else 0
    tokens = sum(v[0] for v in by_batch.values())
    seconds = sum(v[1] for v in by_batch.values())
    return {"requests": len(prompts), "prompt_tokens": len(prompts[0]),
            "new_tokens": new_tokens, "wall_s": wall, "peak_decoding": peak,
            "preempted_requests": len(preempted),
            "decode_tok_s_all_batches": tokens / seconds if seconds else None,
            "decode_tok_s_at_peak_batch": (by_batch[top][0] / by_batch[top][1]
                                           if top and by_batch[top][1] else None),
            "peak_batch": top,
            "decode_by_batch": {str(b): {"tokens": v[0], "seconds": v[1]}
                                for b, v in sorted(by_batch.items())}}


def child(args: argparse.Namespace) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from redknot_vllm import engine_args

    model = model_dir("llama8b", Path(args.workdir))
    kw = dict(ENGINE, max_num_batched_tokens=args.chunk, enforce_eager=args.enforce_eager)
    if args.smoke:  # the script's own check on CPU: 8B's layer and head counts, tiny widths
        from ttft import LLAMA8B

        tiny = Path(args.workdir) / "llama-8b-layout-tiny"
        tiny.mkdir(parents=True, exist_ok=True)
        (tiny / "config.json").write_text(json.dumps(dict(
            LLAMA8B, hidden_size=256, intermediate_size=512, num_attention_heads=8,
            head_dim=32, max_position_embeddings=8192)))
        model = str(tiny)
        kw = dict(kw, max_model_len=4096, kv_cache_memory_bytes=512 << 20)
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
    plen = args.context - NEW_TOKENS
    if args.engine != "redknot":  # RedKnot without SegPaged decodes like dense
        out["decode"] = run_batch(llm, [prompt(plen) for _ in range(args.batch)], NEW_TOKENS,
                                  "decode")
        print(f"[segpaged] {args.engine} decode: {out['decode']['decode_tok_s_at_peak_batch']}"
              f" tok/s at batch {out['decode']['peak_batch']}", flush=True)
        cap = out["capacity"]["max_concurrency"]
        n = args.sessions or max(int(cap * 1.25), int(cap) + 4)
        out["sessions"] = run_batch(llm, [prompt(plen) for _ in range(n)], 16, "sessions")
        print(f"[segpaged] {args.engine} sessions: {out['sessions']['peak_decoding']} held of "
              f"{n} ({out['sessions']['preempted_requests']} preempted)", flush=True)
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
                   str(args.prompts), "--sessions", str(args.sessions), "--lengths",
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
    return {
        **env_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "random-weight Llama-3.1-8B shape (benchmarks/ttft.py, load_format dummy)",
        "config": {"head_config": HEAD_CONFIG, "sparse_ffn": None, "engine": ENGINE,
                   "max_num_batched_tokens": args.chunk, "context": args.context,
                   "decode_batch": args.batch, "new_tokens": NEW_TOKENS,
                   "enforce_eager": args.enforce_eager, "prompts_per_length": args.prompts,
                   "engines": {"dense": "stock vLLM", "redknot": "RedKnot head classes",
                               "segpaged": "RedKnot head classes + SegPaged"}},
        "max_concurrency": {
            "dense": get("dense", "capacity", "max_concurrency"),
            "redknot": get("segpaged", "capacity", "max_concurrency"),
            "redknot_without_segpaged": get("redknot", "capacity", "max_concurrency"),
            "held_dense": get("dense", "sessions", "peak_decoding"),
            "held_redknot": get("segpaged", "sessions", "peak_decoding")},
        "decode_tok_s": {
            "dense": get("dense", "decode", "decode_tok_s_at_peak_batch"),
            "redknot": get("segpaged", "decode", "decode_tok_s_at_peak_batch"),
            "batch_dense": get("dense", "decode", "peak_batch"),
            "batch_redknot": get("segpaged", "decode", "peak_batch")},
        "ttft_median_s": med,
        "quality": None,  # the Qwen2.5-0.5B cells: not run with this script (docs/segpaged.md)
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/segpaged-h200.json"))
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--workdir", default="/tmp/rks")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=0, help="0: vLLM's figure + 25%%")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--allow-partial", action="store_true")
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
