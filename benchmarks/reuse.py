"""Offline KV reuse against dense vLLM and vLLM prefix caching (one run, one GPU).

    python benchmarks/reuse.py --out results/reuse-h100.json           # GPU: 8B shape, 32K/64K
    python benchmarks/reuse.py --model smollm2 --lengths 1024 --prompts 2 --out /tmp/r.json
    # split over two calls: the second finds the first's results in --workdir
    python benchmarks/reuse.py --workdir /tmp/rkr --engines quality stock
    python benchmarks/reuse.py --workdir /tmp/rkr --engines redknot

Workload per length N: 8 documents of about N/8 tokens, stored once; every timed prompt is a
unique 16-token header, the 8 documents in a fresh random order, and a 32-token question.

* dense: stock vLLM (prefix caching on, as by default); the unique header means no hits.
* prefix cache: stock vLLM, the documents in their stored order behind a fixed header, warmed
  once with another question: only the question is computed (its best case).
* RedKnot: the same engine arguments, every head global (so only reuse differs from dense),
  reuse policy ``selective``; segments precomputed (stored alone, deviation-probed) before
  timing. Tiers: ``gpu`` (segments resident in GPU memory), ``host`` (host memory, copied per
  request), ``disk`` (loaded and checksum-verified from safetensors per request); the copy
  or load is inside the TTFT. The GPU tier is timed at every ``--fractions`` share of
  recomputed tokens (per request, ``kv_transfer_params``); host and disk at the first.

TTFT is the wall clock of ``generate()`` with ``max_tokens=1``, one request at a time, after a
warm-up. Quality comes from the quality harness (:mod:`redknot_vllm.quality`, SmolLM2 real
weights): its six tasks, each case's context cut into documents of ``--quality-doc-tokens``
that are precomputed, then the case answered with reuse at every ``--fractions`` share and
with reuse off (dense attention, the same engine); reuse runs first, so the prefix cache
holds no dense KV of the case. Each engine runs in its own subprocess; ``--workdir`` keeps
finished engines' results, so ``--engines`` can split the run over several calls.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import os
import random
import shutil
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

from ttft import LLAMA8B, QWEN05, env_info, model_dir  # noqa: E402

from redknot_vllm.config import RECOMPUTE_SELECT, REUSE_POLICIES  # noqa: E402

DOCS = 8
HEADER, QUESTION = 16, 32
ENGINE: dict[str, dict[str, Any]] = {
    "llama8b": {"load_format": "dummy", "max_model_len": 65536 + 512,
                "max_num_batched_tokens": 65536 + 512, "gpu_memory_utilization": 0.6},
    "smollm2": {"max_model_len": 8192, "max_num_batched_tokens": 8192},
    # Qwen2.5-Coder-0.5B's shape, random weights (speed only; quality runs the real model)
    "qwen05shape": {"load_format": "dummy", "max_model_len": 32768,
                    "max_num_batched_tokens": 32768, "gpu_memory_utilization": 0.5},
}
TIERS = {"gpu": (24 << 30, 32 << 30), "host": (0, 64 << 30), "disk": (0, 0)}
SMOLLM2 = {"num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64}
SHAPES = {"llama8b": LLAMA8B, "smollm2": SMOLLM2, "qwen05shape": QWEN05}


def all_global(model: str | dict[str, Any]) -> Any:
    """Every head global: RedKnot attention is dense, so only reuse differs from dense.
    ``model``: a name of :data:`SHAPES` or an HF ``config.json`` dict."""
    from redknot_vllm import HeadConfig

    cfg = SHAPES[model] if isinstance(model, str) else model
    return HeadConfig.shape(cfg["num_hidden_layers"], cfg["num_key_value_heads"], 1.0,
                            window=4096)


def workload(n: int, vocab: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed + n)
    size = (n - HEADER - QUESTION) // DOCS
    return [[rng.randrange(100, vocab) for _ in range(size)] for _ in range(DOCS)]


def engine_kwargs(model: str) -> dict[str, Any]:
    import torch

    kw = dict(ENGINE[model], seed=0, enforce_eager=False, disable_log_stats=True)
    if ENGINE[model].get("load_format") == "dummy":
        kw["skip_tokenizer_init"] = True
    if not torch.cuda.is_available():
        kw.update(dtype="float32", kv_cache_memory_bytes=1536 << 20, enforce_eager=True,
                  max_num_batched_tokens=4096)
    return kw


def child(a: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    from redknot_vllm import engine_args, request_stats

    model = model_dir(a.model, Path(a.workdir))
    vocab = SHAPES[a.model].get("vocab_size", 49000)  # random ids below SmolLM2's vocab
    kw = engine_kwargs(a.model)
    rng = random.Random(99)

    def rand(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def ttft(prompt: list[int], fraction: float | None = None) -> tuple[float, str]:
        extra = None if fraction is None else {"kv_transfer_params": {"redknot": {
            "reuse": "auto", "recompute_fraction": fraction}}}
        sp = SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra)
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
        gpu, host = TIERS["gpu"]
        llm = LLM(**engine_args(model, head_config=all_global(a.model), reuse={
            "store_dir": a.store, "gpu_bytes": gpu, "host_bytes": host, "chunk": a.chunk,
            "recompute_fraction": a.fractions[0], "client_store": True}, **kw))
    res["engine_start_s"] = time.perf_counter() - t0
    tier_now = "gpu"  # the engine's reuse options above
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

            if tier_now != "gpu":
                llm.collective_rpc("redknot_reuse_tiers", args=TIERS["gpu"])
                tier_now = "gpu"
            t = time.perf_counter()
            precompute(llm, docs, probe=rand(64), progress=False)
            row["precompute_s"] = time.perf_counter() - t
            for tier in a.tiers:
                if tier == "disk" and n > a.disk_max_len:
                    continue
                if tier != tier_now:  # reopening drops the segments held in memory
                    llm.collective_rpc("redknot_reuse_tiers", args=TIERS[tier])
                    tier_now = tier
                for frac in a.fractions if tier == "gpu" else a.fractions[:1]:
                    # warm-up (and promotion into the tier)
                    ttft(rand(HEADER) + shuffled(docs) + rand(QUESTION), frac)
                    times, stats = [], []
                    for _ in range(a.prompts if tier != "disk" else a.disk_prompts):
                        s, rid = ttft(rand(HEADER) + shuffled(docs) + rand(QUESTION), frac)
                        times.append(s)
                        stats.append(request_stats(llm, [rid]).get(rid, {}))
                    row[f"{tier}@{frac}"] = {"ttft_s": times, "request_stats": stats}
                    if (a.profile and tier == "gpu" and frac == a.fractions[0]
                            and n == max(a.lengths)):
                        prompt = rand(HEADER) + shuffled(docs) + rand(QUESTION)
                        profile_request(llm, lambda p=prompt, f=frac: ttft(p, f),
                                        Path(a.json_out).with_suffix(".profile.txt"), n)
                    print(f"[reuse] {n} {tier} fraction {frac}: median TTFT "
                          f"{statistics.median(times):.4f} s, reused "
                          f"{stats[-1].get('reused_tokens')} of {n}", flush=True)
        res["lengths"][str(n)] = row
        if a.engine == "stock":
            print(f"[stock] {n}: {json.dumps(row)}", flush=True)
    Path(a.json_out).write_text(json.dumps(res))


def profile_request(llm: Any, request: Any, path: Path, n: int) -> None:
    """One reuse request under torch.profiler: ops by device time and by host time (the
    fixed per-request cost is host work: catalog match, splice, bookkeeping)."""
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        wall, _ = request()
    ev = prof.key_averages()
    dev = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.write_text(f"one reuse request of {n} tokens, wall {wall:.4f} s (profiled)\n\n"
                    f"## by device time\n{ev.table(sort_by=dev, row_limit=40)}\n\n"
                    f"## by host time\n{ev.table(sort_by='self_cpu_time_total', row_limit=40)}"
                    "\n")
    print(f"[reuse] profile of one request -> {path}", flush=True)


def documents(case: Any, size: int, min_tokens: int, split: str = "fixed") -> list[list[int]]:
    """A harness case's context cut into documents; the question stays computed.

    ``fixed``: every ``size`` tokens. ``records``: at the case's document boundaries
    (``Case.doc_starts``: each record or source file with the filler after it; the header
    before the first goes with it), for the tasks that have them, else as ``fixed``. A
    piece shorter than ``min_tokens`` joins the previous one."""
    ctx = list(case.context_ids)
    cuts = [c for c in case.doc_starts if 0 < c < len(ctx)] if split == "records" else []
    if cuts:
        bounds = [0, *cuts, len(ctx)]
        docs = [ctx[a:b] for a, b in itertools.pairwise(bounds)]
    else:
        docs = [ctx[i:i + size] for i in range(0, len(ctx), size)]
    out: list[list[int]] = []
    for d in docs:
        if out and len(d) < min_tokens:
            out[-1] += d
        else:
            out.append(d)
    return out


def store_context(tok: Any, a: argparse.Namespace) -> list[int] | None:
    """``--quality-store-context``: the engine's ``reuse.store_context`` (token ids), which
    every document is computed behind when stored (None: each is prefilled alone).
    ``case``: the first ``--quality-store-context-tokens`` of the context of a case of the
    first task drawn with another seed: its first documents and the filler between them
    (multidoc_qa_many: 17 records at 1,024 tokens), which name other people and are never
    in a prompt."""
    from redknot_vllm import quality

    if a.quality_store_context == "none":
        return None
    n = a.quality_store_context_tokens
    case = quality.make_cases(tok, a.quality_tasks[:1], [n + 512], 1,
                              a.quality_seed + 1000)[0]
    return list(case.context_ids)[:n]


def partial_file(result: Path) -> Path:
    """Where a quality run keeps its cases so far, beside its final ``result``."""
    return result.with_suffix(".partial.json")


def quality_store(work: Path, need_bytes: int) -> Path:
    """A RAM-backed folder for the quality run's many segments when there is room (the disk
    tier is only the catalog's index here; its speed is measured by the 8B run)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * need_bytes:
        return Path(tempfile.mkdtemp(prefix="rk-quality-", dir=shm))
    return work / "quality-store"


def quality_child(a: argparse.Namespace) -> None:
    """The quality harness's tasks with their contexts reused (``--quality-model``, real
    weights)."""
    from dataclasses import asdict

    from transformers import AutoTokenizer
    from vllm import LLM

    from redknot_vllm import engine_args, quality
    from redknot_vllm.config import ReuseConfig
    from redknot_vllm.registry import resolve_model
    from redknot_vllm.reuse import precompute

    qm = a.quality_model
    model = model_dir("smollm2", Path(a.workdir)) if qm == "smollm2" else resolve_model(qm)
    tok = AutoTokenizer.from_pretrained(model)
    cases = quality.make_cases(tok, a.quality_tasks, a.quality_lengths, a.quality_n,
                               a.quality_seed)
    # round robin over the (task, length) cells, so a run cut short has every cell at an
    # equal n (its partial file then still reads as a smaller, balanced run)
    cases.sort(key=lambda c: (c.index, a.quality_tasks.index(c.task), c.tokens))
    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * 2 * (cfg["num_hidden_layers"] * cfg["num_key_value_heads"]
                         * head_dim)  # bf16 K and V bytes per token
    batch_bytes = a.quality_batch * max(a.quality_lengths) * per_token
    store = quality_store(Path(a.workdir), batch_bytes)
    kw = dict(engine_kwargs("smollm2"), enforce_eager=True)  # a CUDA-graph step never reuses
    if max(a.quality_lengths) > kw["max_model_len"]:
        top = max(a.quality_lengths)
        kw.update(max_model_len=top, max_num_batched_tokens=max(kw["max_num_batched_tokens"],
                                                                top))
    # every head global by default, so only reuse differs from dense; with
    # --quality-head-config, "dense" is that config without reuse (the same engine)
    head = a.quality_head_config or all_global(cfg)
    context = store_context(tok, a)
    llm = LLM(**engine_args(model, head_config=head,
                            reuse={"store_dir": str(store), "chunk": a.chunk,
                                   "policy": a.quality_policy,
                                   "store_context": context,
                                   "gpu_bytes": 4 << 30, "host_bytes": 8 << 30,
                                   "disk_bytes": 3 * batch_bytes, "client_store": True},
                            **kw))
    min_tokens = ReuseConfig().min_tokens

    def mode(frac: float | None, select: str = "deviation") -> dict[str, Any]:
        p = {"reuse": "off"} if frac is None else {"reuse": "auto", "recompute_fraction": frac,
                                                    "recompute_select": select}
        return {"kv_transfer_params": {"redknot": p}}

    def side_mode(case: Any, frac: float, select: str, side: str) -> dict[str, Any]:
        """Reuse, as marked ranges, only the documents before (``side="before"``) or after
        the first one whose text holds the answer; that one and the rest are computed."""
        docs = documents(case, a.quality_doc_tokens, min_tokens, a.quality_doc_split)
        ends = list(itertools.accumulate(len(d) for d in docs))
        spans = list(zip([0, *ends[:-1]], ends, strict=True))
        asked = next((j for j, d in enumerate(docs) if case.answers[0] in tok.decode(d)),
                     None)
        if asked is None:
            raise SystemExit(f"--quality-sides: no document of case {case.index} holds "
                             f"its answer {case.answers[0]!r}")
        ranges = [list(sp) for j, sp in enumerate(spans)
                  if (j < asked if side == "before" else j > asked)]
        return {"kv_transfer_params": {"redknot": {
            "reuse": ranges or "off", "recompute_fraction": frac, "recompute_select": select}}}

    # a mode per (share, selection rule): "0.15" (deviation, the default) or "0.15-question"
    modes = {(str(f) if sel == "deviation" else f"{f}-{sel}"): (f, sel)
             for f in a.fractions for sel in a.selects}
    if a.quality_policy == "seed":  # every token computed: shares and rules do not apply
        modes = {"seed": (a.fractions[0], a.selects[0])}
    # diagnostic: only the documents before (or after) the one holding the answer reused,
    # as marked ranges, the others computed: "0.15-question-before"
    sided = {f"{name}-{side}": (f, sel, side) for name, (f, sel) in modes.items()
             for side in a.quality_sides if side != "all"}
    if "all" not in a.quality_sides:
        modes = {}
    for name, (f, sel, _) in sided.items():
        modes[name] = (f, sel)
    outs: dict[str, list[quality.Outcome]] = {k: [] for k in (*modes, "dense")}
    n_docs = 0
    partial = partial_file(Path(a.json_out))
    done = 0
    if partial.is_file():  # an earlier call of the same run was cut off: go on from it
        prev = json.loads(partial.read_text())
        outs = {k: [quality.Outcome(**{**o, "first_logprobs": {
            int(t): lp for t, lp in o["first_logprobs"].items()}}) for o in v]
            for k, v in prev["outcomes"].items()}  # JSON keys are strings
        done, n_docs = prev["cases_done"], prev["documents"]
        print(f"[quality] resuming after {done}/{len(cases)} cases", flush=True)
    t0 = time.perf_counter()

    def write(path: Path, cases_done: int) -> dict[str, Any]:
        by_fraction = {}
        pooled_d = sum(o.correct for o in outs["dense"])
        for name in modes:
            cells = quality.compare(outs["dense"], outs[name])
            summary = quality.summarize(cells, quality.Bar(avg_ratio=0.97, min_cell_ratio=0.0))
            pooled_r = sum(o.correct for o in outs[name])
            by_fraction[name] = {**summary, "pooled_ratio": pooled_r / pooled_d if pooled_d
                                 else None, "cells": [c.as_dict() for c in cells]}
        path.write_text(json.dumps({
            **env_info(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "harness": "redknot_vllm.quality: its tasks, each case's context cut into documents "
                       + (f"of {a.quality_doc_tokens} tokens" if a.quality_doc_split == "fixed"
                          else "at its records / source files (other tasks: "
                               f"{a.quality_doc_tokens}-token pieces)")
                       + (", precomputed alone" if context is None else
                          f", precomputed behind a store context of {len(context)} tokens "
                          "(the start of a case of the task drawn with another seed)")
                       + " and reused in place "
                       "(relocated from position 0); dense = reuse off in the same engine "
                       f"({'its head config' if a.quality_head_config else 'every head global'}"
                       "), run after the reuse modes",
            "model": qm, "selects": a.selects, "policy": a.quality_policy,
            "store_context": {"kind": a.quality_store_context, "tokens": len(context or [])},
            "head_config": a.quality_head_config or "every head global",
            "tasks": list(a.quality_tasks), "lengths": a.quality_lengths, "n": a.quality_n,
            "cases_done": cases_done, "cases": len(cases),
            "seed": a.quality_seed, "documents": n_docs, "store": str(store),
            "by_fraction": by_fraction,
            "outcomes": {k: [asdict(o) for o in v] for k, v in outs.items()}}))
        return by_fraction

    for i in range(done, len(cases), a.quality_batch):
        batch = cases[i:i + a.quality_batch]
        docs = [d for c in batch for d in documents(c, a.quality_doc_tokens, min_tokens,
                                                    a.quality_doc_split)]
        n_docs += len(docs)
        precompute(llm, docs, progress=False)
        for name, (f, sel) in modes.items():  # before dense: it would fill the prefix cache
            if name in sided:
                outs[name] += [quality.run_cases(
                    llm, [c], redknot=True, use_tqdm=False,
                    extra_args=side_mode(c, f, sel, sided[name][2]))[0] for c in batch]
                continue
            outs[name] += quality.run_cases(llm, batch, redknot=True, use_tqdm=False,
                                            extra_args=mode(f, sel))
        outs["dense"] += quality.run_cases(llm, batch, redknot=True, use_tqdm=False,
                                           extra_args=mode(None))
        print(f"[quality] {i + len(batch)}/{len(cases)} cases, {time.perf_counter() - t0:.0f} s",
              flush=True)
        write(partial, i + len(batch))
    shutil.rmtree(store, ignore_errors=True)
    by_fraction = write(Path(a.json_out), len(cases))
    partial.unlink(missing_ok=True)
    for name, f in by_fraction.items():
        print(f"[quality] {name}: avg ratio {f['avg_ratio']}, min cell {f['min_ratio']}, "
              f"pooled {f['pooled_ratio']}, FLOPs saved {f['flops_saved']}", flush=True)


def parent(a: argparse.Namespace) -> None:
    from redknot_vllm.config import ReuseConfig

    work = Path(a.workdir or tempfile.mkdtemp(prefix="rk-reuse-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.quality_model != "smollm2":  # the children cache under the workdir: convert once
        from redknot_vllm.registry import resolve_model

        a.quality_model = resolve_model(a.quality_model)
    shared = ["--model", a.model, "--lengths", *map(str, a.lengths), "--prompts", str(a.prompts),
              "--tiers", *a.tiers, "--disk-max-len", str(a.disk_max_len), "--disk-prompts",
              str(a.disk_prompts), "--quality-n", str(a.quality_n), "--chunk", str(a.chunk),
              "--fractions", *map(str, a.fractions), "--quality-lengths",
              *map(str, a.quality_lengths), "--quality-seed", str(a.quality_seed),
              "--quality-doc-tokens", str(a.quality_doc_tokens), "--quality-doc-split",
              a.quality_doc_split, "--quality-batch",
              str(a.quality_batch), "--quality-model", a.quality_model,
              "--quality-tasks", *a.quality_tasks, "--selects", *a.selects]
    if a.quality_store_context != "none":  # (earlier runs' keys stay)
        shared += ["--quality-store-context", a.quality_store_context,
                   "--quality-store-context-tokens", str(a.quality_store_context_tokens)]
    if a.quality_sides != ["all"]:  # (earlier runs' keys stay)
        shared += ["--quality-sides", *a.quality_sides]
    if a.quality_policy != "selective" or a.quality_head_config:  # (earlier runs' keys stay)
        shared += ["--quality-policy", a.quality_policy,
                   *(["--quality-head-config", a.quality_head_config]
                     if a.quality_head_config else [])]
    key = hashlib.sha256(json.dumps(shared).encode()).hexdigest()[:12]
    wanted = [*(["quality"] if a.quality_n else []), "stock", "redknot"]
    runs: dict[str, Any] = {}
    for engine in wanted:
        js = work / f"{engine}-{key}.json"
        if engine in a.engines and not js.is_file():
            # SmolLM2 engines with a separate engine-core process hung at start on the H100
            # (and a profiled engine runs in this child, where the profiler sees it)
            in_proc = engine == "quality" or (engine == "redknot" and a.profile)
            env = {**os.environ, **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_proc else {})}
            store = work / f"store-{key}"
            subprocess.run([sys.executable, __file__, "--child", "--workdir", str(work),
                            "--store", str(store), *shared, "--engine", engine,
                            "--json-out", str(js), *(["--profile"] if a.profile else [])],
                           check=True, env=env)
            shutil.rmtree(store, ignore_errors=True)
        if js.is_file():
            runs[engine] = json.loads(js.read_text())
        elif engine == "quality" and a.allow_partial and partial_file(js).is_file():
            runs[engine] = json.loads(partial_file(js).read_text())
            print(f"[reuse] quality: partial, {runs[engine]['cases_done']} of "
                  f"{runs[engine]['cases']} cases", flush=True)
    prof = work / f"redknot-{key}.profile.txt"
    if prof.is_file():  # the profile lands beside the results
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(prof, Path(a.out).with_suffix(".profile.txt"))
    missing = [e for e in wanted if e not in runs]
    if missing:
        print(f"[reuse] not assembled yet: run --engines {' '.join(missing)} --workdir {work}",
              flush=True)
        return
    stock, rk = runs["stock"], runs["redknot"]
    quality = runs.get("quality")
    results = []
    for n in map(str, a.lengths):
        d, r = stock["lengths"][n], rk["lengths"][n]
        dense_med = statistics.median(d["dense_ttft_s"])
        pc_med = statistics.median(d["prefix_cache_ttft_s"])
        for tier in a.tiers:
            for frac in a.fractions:
                run = r.get(f"{tier}@{frac}")
                if run is None:
                    continue
                med = statistics.median(run["ttft_s"])
                st = run["request_stats"]
                q = quality["by_fraction"].get(str(frac)) if quality else None
                results.append({
                    "model": a.model, "tokens": int(n), "tier": tier, "recompute_fraction": frac,
                    "dense_ttft_s": d["dense_ttft_s"],
                    "prefix_cache_ttft_s": d["prefix_cache_ttft_s"],
                    "redknot_ttft_s": run["ttft_s"],
                    "reuse_ttft_s": run["ttft_s"],  # the issue's name for the same figures
                    "speedup_vs_dense_median": dense_med / med,
                    "speedup_vs_prefix_cache_median": pc_med / med,
                    "reused_tokens": [s.get("reused_tokens") for s in st],
                    "flops_saved": [s.get("flops_saved") for s in st],
                    "precompute_s": r.get("precompute_s"),
                    "quality_ratio": q["avg_ratio"] if q else None,
                    "quality_min_cell_ratio": q["min_ratio"] if q else None,
                })
    doc = {**env_info(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": a.model, "policy": "selective",
           "config": {"engine": engine_kwargs(a.model), "docs": DOCS, "header_tokens": HEADER,
                      "question_tokens": QUESTION, "prompts_per_length": a.prompts,
                      "head_config": "every head global (reuse alone)",
                      "reuse": {"policy": "selective",
                                "recompute_first": ReuseConfig().recompute_first,
                                "recompute_fractions": a.fractions, "chunk": a.chunk},
                      "tiers": {k: {"gpu_bytes": v[0], "host_bytes": v[1]}
                                for k, v in TIERS.items()},
                      "ttft": "wall clock of generate(), max_tokens=1, one request at a time, "
                              "after a warm-up; tier copies and disk loads included",
                      "quality_ratio": "the quality harness's avg over task x length cells of "
                                       "reuse accuracy / dense accuracy (SmolLM2)"},
           "engine_start_s": {"dense": stock["engine_start_s"],
                              "redknot": rk["engine_start_s"]},
           "results": results,
           # per (model, rule, task, length): reuse against dense in the same engine
           "quality": [{"model": Path(quality["model"]).name, "select": name,
                        "recompute_fraction": float(name.split("-")[0]), "task": c["task"],
                        "tokens": c["tokens"], "n": c["n"], "dense_acc": c["dense_acc"],
                        "reuse_acc": c["redknot_acc"], "ratio": c["ratio"]}
                       for name, f in quality["by_fraction"].items() for c in f["cells"]]
           if quality else [],
           "quality_run": quality and {k: v for k, v in quality.items() if k != "outcomes"}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    if quality:
        raw = Path(a.out).with_suffix(".quality-outcomes.json")
        raw.write_text(json.dumps(quality["outcomes"]) + "\n")
    for row in results:
        print(f"{row['tokens']:>6} {row['tier']:>4} @{row['recompute_fraction']}: dense "
              f"{statistics.median(row['dense_ttft_s']):.3f} s, prefix cache "
              f"{statistics.median(row['prefix_cache_ttft_s']):.3f} s, RedKnot "
              f"{statistics.median(row['redknot_ttft_s']):.3f} s: "
              f"{row['speedup_vs_dense_median']:.2f}x dense, "
              f"{row['speedup_vs_prefix_cache_median']:.2f}x prefix cache, quality ratio "
              f"{row['quality_ratio']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama8b", choices=sorted(ENGINE))
    p.add_argument("--profile", action="store_true", help="also profile one reuse request "
                   "(GPU tier, first fraction, longest length) under torch.profiler, beside "
                   "--out as .profile.txt")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--tiers", nargs="+", default=["gpu", "host", "disk"])
    p.add_argument("--disk-max-len", type=int, default=32768)
    p.add_argument("--disk-prompts", type=int, default=2)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.15, 0.1],
                   help="recompute fractions (per request); the first is the engine's")
    p.add_argument("--quality-n", type=int, default=30,
                   help="harness cases per task and length; 0 skips the quality run")
    p.add_argument("--quality-lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--quality-seed", type=int, default=1)
    p.add_argument("--quality-doc-tokens", type=int, default=1024)
    p.add_argument("--quality-doc-split", choices=["records", "fixed"], default="records",
                   help="segments = the task's documents (records, source files) where it "
                        "has them, or every --quality-doc-tokens tokens")
    p.add_argument("--quality-batch", type=int, default=40,
                   help="cases whose documents are stored at a time")
    p.add_argument("--chunk", type=int, default=16, help="reuse.chunk (recompute granularity)")
    p.add_argument("--quality-model", default="smollm2",
                   help="smollm2 or a registry model (qwen2.5-coder-0.5b) for the quality part")
    p.add_argument("--quality-tasks", nargs="+", default=None,
                   help="the quality harness's tasks (default: all)")
    p.add_argument("--selects", nargs="+", default=["deviation"],
                   choices=list(RECOMPUTE_SELECT),
                   help="recompute_select rules measured at every --fractions share")
    p.add_argument("--quality-policy", choices=list(REUSE_POLICIES), default="selective",
                   help="the quality engine's reuse.policy (seed: every token computed, the "
                        "local heads read the stored KV; needs a head config with local "
                        "heads, --quality-head-config)")
    p.add_argument("--quality-head-config",
                   help="the quality engine's head config (default: every head global)")
    p.add_argument("--quality-sides", nargs="+", choices=["all", "before", "after"],
                   default=["all"],
                   help="diagnostic: reuse every document (all), or only those before / "
                        "after the one holding the answer (the others computed)")
    p.add_argument("--quality-store-context", choices=["none", "case"], default="none",
                   help="reuse.store_context of the quality engine: none (documents "
                        "prefilled alone) or case (the start of another case of the task)")
    p.add_argument("--quality-store-context-tokens", type=int, default=1024,
                   help="--quality-store-context case: its length in tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reuse-h100.json"))
    p.add_argument("--engines", nargs="+", default=["quality", "stock", "redknot"],
                   help="the engines this call runs (others are read from --workdir)")
    p.add_argument("--allow-partial", action="store_true",
                   help="assemble with a quality run that was cut off (its cases so far)")
    p.add_argument("--child", action="store_true")
    p.add_argument("--engine", choices=["stock", "redknot", "quality"])
    p.add_argument("--workdir", help="keeps finished engines' results (default: a new "
                   "temporary folder)")
    p.add_argument("--store")
    p.add_argument("--json-out")
    a = p.parse_args()
    if a.quality_tasks is None:
        from redknot_vllm import quality

        a.quality_tasks = list(quality.TASKS)
    if a.child:
        os.environ.setdefault("VLLM_REDKNOT_CACHE_DIR", str(Path(a.workdir) / "cache"))
        (quality_child if a.engine == "quality" else child)(a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
