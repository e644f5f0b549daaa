"""Offline KV reuse against dense vLLM and vLLM prefix caching (one run, one GPU).

    python benchmarks/reuse.py --out results/reuse-h100.json           # GPU: 8B shape, 32K/64K
    python benchmarks/reuse.py --model smollm2 --lengths 1024 --prompts 2 --out /tmp/r.json

Workload per length N: 8 documents of about N/8 tokens, stored once; every timed prompt is a
unique 16-token header, the 8 documents in a fresh random order, and a 32-token question.

* dense: stock vLLM (prefix caching on, as by default); the unique header means no hits.
* prefix cache: stock vLLM, the documents in their stored order behind a fixed header, warmed
  once with another question: only the question is computed (its best case).
* RedKnot: the same engine arguments, every head global (so only reuse differs from dense),
  reuse policy ``selective``; segments precomputed (stored alone, deviation-probed) before
  timing. Tiers: ``gpu`` (segments resident in GPU memory), ``host`` (host memory, copied per
  request), ``disk`` (loaded and checksum-verified from safetensors per request); the copy
  or load is inside the TTFT.

TTFT is the wall clock of ``generate()`` with ``max_tokens=1``, one request at a time, after a
warm-up. Quality comes from ``--quality`` (SmolLM2, real weights): vault-code questions over
6 stored documents in random order, reuse against the same engine with reuse off.
Each engine runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from ttft import LLAMA8B, env_info, model_dir  # noqa: E402

DOCS = 8
HEADER, QUESTION = 16, 32
ENGINE: dict[str, dict[str, Any]] = {
    "llama8b": {"load_format": "dummy", "max_model_len": 65536 + 512,
                "max_num_batched_tokens": 65536 + 512, "gpu_memory_utilization": 0.6},
    "smollm2": {"max_model_len": 8192, "max_num_batched_tokens": 8192},
}
TIERS = {"gpu": (24 << 30, 32 << 30), "host": (0, 64 << 30), "disk": (0, 0)}


def workload(n: int, vocab: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed + n)
    size = (n - HEADER - QUESTION) // DOCS
    return [[rng.randrange(100, vocab) for _ in range(size)] for _ in range(DOCS)]


def engine_kwargs(model: str) -> dict[str, Any]:
    import torch

    kw = dict(ENGINE[model], seed=0, enforce_eager=False, disable_log_stats=True)
    if model == "llama8b":
        kw["skip_tokenizer_init"] = True
    if not torch.cuda.is_available():
        kw.update(dtype="float32", kv_cache_memory_bytes=1536 << 20, enforce_eager=True,
                  max_num_batched_tokens=4096)
    return kw


def child(a: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    from redknot_vllm import HeadConfig, engine_args, request_stats

    model = model_dir(a.model, Path(a.workdir))
    vocab = LLAMA8B["vocab_size"] if a.model == "llama8b" else 49000
    kw = engine_kwargs(a.model)
    rng = random.Random(99)

    def rand(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def ttft(prompt: list[int]) -> tuple[float, str]:
        sp = SamplingParams(max_tokens=1, temperature=0.0)
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        return time.perf_counter() - t, out.request_id

    def shuffled(docs: list[list[int]]) -> list[int]:
        order = list(range(len(docs)))
        rng.shuffle(order)
        return [t for i in order for t in docs[i]]

    res: dict[str, Any] = {"engine": a.engine, "lengths": {}}
    t0 = time.perf_counter()
    if a.engine == "stock":
        llm = LLM(model=model, **kw)
    else:
        n_layers = LLAMA8B["num_hidden_layers"] if a.model == "llama8b" else 30
        n_kv = LLAMA8B["num_key_value_heads"] if a.model == "llama8b" else 3
        hc = HeadConfig.shape(n_layers, n_kv, 1.0, window=4096)
        gpu, host = TIERS["gpu"]
        llm = LLM(**engine_args(model, head_config=hc, reuse={
            "store_dir": a.store, "gpu_bytes": gpu, "host_bytes": host, "chunk": a.chunk},
            **kw))
    res["engine_start_s"] = time.perf_counter() - t0
    for n in a.lengths:
        docs = workload(n, vocab)
        row: dict[str, Any] = {}
        if a.engine == "stock":
            ttft(rand(HEADER) + shuffled(docs) + rand(QUESTION))  # warm-up
            row["dense_ttft_s"] = [ttft(rand(HEADER) + shuffled(docs) + rand(QUESTION))[0]
                                   for _ in range(a.prompts)]
            fixed = rand(HEADER) + [t for d in docs for t in d]
            ttft(fixed + rand(QUESTION))  # fills the prefix cache
            row["prefix_cache_ttft_s"] = [ttft(fixed + rand(QUESTION))[0]
                                          for _ in range(a.prompts)]
        else:
            from redknot_vllm.reuse import precompute

            t = time.perf_counter()
            precompute(llm, docs, probe=rand(64), progress=False)
            row["precompute_s"] = time.perf_counter() - t
            for tier in a.tiers:
                if tier == "disk" and n > a.disk_max_len:
                    continue
                llm.collective_rpc("redknot_reuse_tiers", args=TIERS[tier])
                ttft(rand(HEADER) + shuffled(docs) + rand(QUESTION))  # warm-up / promotion
                times, stats = [], []
                for _ in range(a.prompts if tier != "disk" else a.disk_prompts):
                    s, rid = ttft(rand(HEADER) + shuffled(docs) + rand(QUESTION))
                    times.append(s)
                    stats.append(request_stats(llm, [rid]).get(rid, {}))
                row[tier] = {"ttft_s": times, "request_stats": stats}
                print(f"[reuse] {n} {tier}: median TTFT {statistics.median(times):.4f} s, "
                      f"reused {stats[-1].get('reused_tokens')} of {n}", flush=True)
        res["lengths"][str(n)] = row
        print(f"[{a.engine}] {n}: {json.dumps({k: v for k, v in row.items() if 'ttft' in k})}",
              flush=True)
    Path(a.json_out).write_text(json.dumps(res))


def quality_child(a: argparse.Namespace) -> None:
    """Vault-code retrieval over stored documents (SmolLM2 real weights), reuse vs off."""
    from vllm import LLM, SamplingParams

    from redknot_vllm import HeadConfig, engine_args
    from redknot_vllm.quality import FILLER_SENTENCES
    from redknot_vllm.reuse import precompute

    model = model_dir("smollm2", Path(a.workdir))
    kw = engine_kwargs("smollm2")
    llm = LLM(**engine_args(model, head_config=HeadConfig.shape(30, 3, 1.0, window=4096),
                            reuse={"store_dir": a.store, "chunk": a.chunk}, **kw))
    tok = llm.get_tokenizer()
    rng = random.Random(2024)
    names = ["amber", "blue", "coral", "dune", "elm", "fern", "gold", "hazel", "iris", "jade",
             "kelp", "lime", "mint", "navy", "olive", "pearl", "quartz", "rose", "sage", "teal",
             "umber", "violet", "wheat", "yew"]
    codes = {nm: str(rng.randrange(10000, 99999)) for nm in names}

    def doc(nm: str) -> list[int]:
        body = " ".join(rng.choice(FILLER_SENTENCES) for _ in range(20))
        text = (f"Record of the {nm} vault. The secret code of the {nm} vault is {codes[nm]}. "
                f"{body} End of the {nm} record.\n")
        return tok(text, add_special_tokens=False)["input_ids"]

    docs = {nm: doc(nm) for nm in names}
    precompute(llm, list(docs.values()), progress=False)
    outcomes = []
    for i in range(a.quality_n):
        chosen = rng.sample(names, 6)
        target = chosen[rng.choice([4, 5])]  # SmolLM2 reads the last documents reliably
        q = tok(f"\nQuestion: what is the secret code of the {target} vault? Answer: The code "
                "is", add_special_tokens=False)["input_ids"]
        head = tok(f"Case {i}. Records follow.\n", add_special_tokens=False)["input_ids"]
        prompt = head + [t for nm in chosen for t in docs[nm]] + q
        row = {"target": target, "tokens": len(prompt)}
        for mode in ("off", "auto"):
            sp = SamplingParams(max_tokens=8, temperature=0.0, extra_args={
                "kv_transfer_params": {"redknot": {"reuse": mode}}})
            text = llm.generate([{"prompt_token_ids": prompt}], sp,
                                use_tqdm=False)[0].outputs[0].text
            row[mode] = {"text": text, "correct": codes[target] in text}
        outcomes.append(row)
    dense = sum(o["off"]["correct"] for o in outcomes) / len(outcomes)
    reuse = sum(o["auto"]["correct"] for o in outcomes) / len(outcomes)
    agree = sum(o["off"]["text"] == o["auto"]["text"] for o in outcomes) / len(outcomes)
    out = {"task": "vault-code retrieval, 6 stored documents in random order, target among the "
                   "last two", "n": len(outcomes), "dense_acc": dense, "reuse_acc": reuse,
           "ratio": reuse / dense if dense else None, "agreement": agree,
           "mean_tokens": statistics.mean(o["tokens"] for o in outcomes), "outcomes": outcomes}
    Path(a.json_out).write_text(json.dumps(out))
    print(f"[quality] dense {dense:.3f} reuse {reuse:.3f} agreement {agree:.3f}", flush=True)


def parent(a: argparse.Namespace) -> None:
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        base = [sys.executable, __file__, "--child", "--workdir", work, "--model", a.model,
                "--lengths", *map(str, a.lengths), "--prompts", str(a.prompts),
                "--store", str(Path(work) / "store"), "--tiers", *a.tiers,
                "--disk-max-len", str(a.disk_max_len), "--disk-prompts", str(a.disk_prompts),
                "--quality-n", str(a.quality_n), "--chunk", str(a.chunk)]
        for engine in (*(["quality"] if a.quality_n else []), "stock", "redknot"):
            js = Path(work) / f"{engine}.json"
            # SmolLM2 engines with a separate engine-core process hung at start on the H100
            env = {**os.environ, **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
                                    if engine == "quality" else {})}
            subprocess.run([*base, "--engine", engine, "--json-out", str(js)], check=True,
                           env=env)
            runs[engine] = json.loads(js.read_text())
    stock, rk = runs["stock"], runs["redknot"]
    quality = runs.get("quality")
    results = []
    for n in map(str, a.lengths):
        d, r = stock["lengths"][n], rk["lengths"][n]
        dense_med = statistics.median(d["dense_ttft_s"])
        pc_med = statistics.median(d["prefix_cache_ttft_s"])
        for tier in a.tiers:
            if tier not in r:
                continue
            med = statistics.median(r[tier]["ttft_s"])
            st = r[tier]["request_stats"]
            results.append({
                "tokens": int(n), "tier": tier,
                "dense_ttft_s": d["dense_ttft_s"], "prefix_cache_ttft_s": d["prefix_cache_ttft_s"],
                "redknot_ttft_s": r[tier]["ttft_s"],
                "speedup_vs_dense_median": dense_med / med,
                "speedup_vs_prefix_cache_median": pc_med / med,
                "reused_tokens": [s.get("reused_tokens") for s in st],
                "flops_saved": [s.get("flops_saved") for s in st],
                "precompute_s": r.get("precompute_s"),
                "quality_ratio": quality["ratio"] if quality else None,
            })
    doc = {**env_info(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": a.model, "policy": "selective",
           "config": {"engine": engine_kwargs(a.model), "docs": DOCS, "header_tokens": HEADER,
                      "question_tokens": QUESTION, "prompts_per_length": a.prompts,
                      "head_config": "every head global (reuse alone)",
                      "reuse": {"policy": "selective", "recompute_first": 16,
                                "recompute_fraction": 0.15, "chunk": a.chunk},
                      "tiers": {k: {"gpu_bytes": v[0], "host_bytes": v[1]}
                                for k, v in TIERS.items()},
                      "ttft": "wall clock of generate(), max_tokens=1, one request at a time, "
                              "after a warm-up; tier copies and disk loads included"},
           "engine_start_s": {"dense": stock["engine_start_s"],
                              "redknot": rk["engine_start_s"]},
           "results": results, "quality": quality and {k: v for k, v in quality.items()
                                                       if k != "outcomes"},
           "quality_outcomes": quality and quality["outcomes"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    for row in results:
        print(f"{row['tokens']:>6} {row['tier']:>4}: dense "
              f"{statistics.median(row['dense_ttft_s']):.3f} s, prefix cache "
              f"{statistics.median(row['prefix_cache_ttft_s']):.3f} s, RedKnot "
              f"{statistics.median(row['redknot_ttft_s']):.3f} s: "
              f"{row['speedup_vs_dense_median']:.2f}x dense, "
              f"{row['speedup_vs_prefix_cache_median']:.2f}x prefix cache")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama8b", choices=["llama8b", "smollm2"])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--tiers", nargs="+", default=["gpu", "host", "disk"])
    p.add_argument("--disk-max-len", type=int, default=32768)
    p.add_argument("--disk-prompts", type=int, default=2)
    p.add_argument("--quality-n", type=int, default=100, help="0 skips the quality run")
    p.add_argument("--chunk", type=int, default=128, help="reuse.chunk (recompute granularity)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reuse-h100.json"))
    p.add_argument("--child", action="store_true")
    p.add_argument("--engine", choices=["stock", "redknot", "quality"])
    p.add_argument("--workdir")
    p.add_argument("--store")
    p.add_argument("--json-out")
    a = p.parse_args()
    if a.child:
        os.environ.setdefault("VLLM_REDKNOT_CACHE_DIR", str(Path(a.workdir) / "cache"))
        (quality_child if a.engine == "quality" else child)(a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
