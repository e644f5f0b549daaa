"""Head-aware PD against vLLM's all-heads PD and the co-located engine, same run.

    python benchmarks/pd.py --out benchmarks/results/pd-h200.json

The random-weight Llama-3.1-8B shape, 1 of 8 KV heads global, W=4096 (the SegPaged
benchmark's config), prompts of ``--context`` tokens. Each engine in a subprocess of its own
(vLLM's KV connector is one per process), one after another; a transfer's file outlives
its producer, so the pairs need not run at once:

* ``colocated``: RedKnot + SegPaged, no PD: wall time of ``generate(max_tokens=2)`` (TTFT +
  the first decode step) and of ``max_tokens=1``;
* ``redknot_pd``: the producer sends each prompt (``max_tokens=1``), the consumer generates 2
  tokens from its transfer; bytes moved = the transfer files' sizes;
* ``dense_pd``: stock vLLM with its ``ExampleConnector`` (every head, every layer, one
  safetensors file per layer) as producer and consumer, the same way; it stores a prompt
  at its first step only, so these engines prefill a prompt in one step.

Disaggregated TTFT + first decode step = the producer's wall time + the consumer's (the
file is written inside the producer's step and read inside the consumer's). A warm-up
prompt of the same length runs first on every engine. ``--smoke``: the same flow on CPU
with the 8B layout at tiny widths.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from segpaged import ENGINE, HEAD_CONFIG, VOCAB, smoke_model  # noqa: E402
from ttft import LLAMA8B, env_info, model_dir  # noqa: E402

MAX_NUM_SEQS = 8
ROLES = ("colocated", "redknot_producer", "redknot_consumer", "dense_producer",
         "dense_consumer")


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from redknot_vllm import engine_args

    work = Path(args.workdir)
    model = model_dir("llama8b", work)
    # one request at a time: max_num_seqs 8 (not the SegPaged benchmark's 256) keeps vLLM's
    # CUDA-graph sizes, and every engine's start-up, small; the same for all five engines
    kw = dict(ENGINE, max_num_batched_tokens=args.chunk, max_model_len=args.context + 512,
              enable_prefix_caching=False, max_num_seqs=MAX_NUM_SEQS)
    if args.smoke:
        model, extra = smoke_model(work)
        kw = {**kw, **extra, "max_model_len": args.context + 512}
        kw.pop("gpu_memory_utilization", None)
    tdir = Path(args.transport_dir)
    rk_dir, dense_dir = tdir / "pd-redknot", tdir / "pd-dense"
    role = args.role
    if role.startswith("dense"):
        # vLLM's ExampleConnector stores a prompt at its first step only: the dense pair
        # prefills each prompt in one step, so every token's KV is stored and moved
        kw = dict(kw, model=model, max_num_batched_tokens=args.context + 512,
                  kv_transfer_config={
            "kv_connector": "ExampleConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(dense_dir)}})
    else:
        pd = None if role == "colocated" else {
            "role": role.removeprefix("redknot_"), "dir": str(rk_dir), "timeout_s": 30}
        kw = engine_args(model, head_config=str(ROOT / HEAD_CONFIG), require_gate=False,
                         segpaged=True, pd=pd, **kw)
    llm = LLM(**kw)
    rng = random.Random(4321)  # the same prompts for every engine
    prompts = [[rng.randrange(100, VOCAB) for _ in range(args.context)]
               for _ in range(1 + args.prompts)]
    transfers = json.loads((work / "pd-transfers.json").read_text()) if \
        role == "redknot_consumer" else []
    out: dict[str, Any] = {**env_info(), "role": role, "wall_s": {}, "transfers": []}
    for i, p in enumerate(prompts):
        extra: dict[str, Any] = {}
        n = 2
        if role in ("redknot_producer", "dense_producer"):
            n = 1
            if role == "redknot_producer":
                extra = {"kv_transfer_params": {"redknot_pd": {"send": True}}}
        elif role == "redknot_consumer":
            extra = {"kv_transfer_params": transfers[i]}
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=extra)
        t = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0]
        dt = time.perf_counter() - t
        out["transfers"].append(res.kv_transfer_params)
        out.setdefault("num_cached_tokens", []).append(res.num_cached_tokens)
        if i:  # the first prompt warms the engine up
            out["wall_s"].setdefault(str(n), []).append(dt)
        if role == "colocated" and i:
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p)], SamplingParams(
                max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
            out["wall_s"].setdefault("1", []).append(time.perf_counter() - t)
    if role == "redknot_producer":
        (work / "pd-transfers.json").write_text(json.dumps(out["transfers"]))
    Path(args.json_out).write_text(json.dumps(out))


def _transport(args: argparse.Namespace) -> Path:
    """The shared folder: host shared memory (the transport a one-host pair would use) when
    it has room for the dense pair's files, else the work folder."""
    if args.transport_dir:
        return Path(args.transport_dir)
    shm = Path("/dev/shm")
    c = LLAMA8B  # K and V of every layer and KV head, bf16, for every prompt (+30%)
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2
    need = per_token * (args.context + 1) * (1 + args.prompts) * 1.3
    if shm.is_dir() and shutil.disk_usage(shm).free > need:
        return shm / "rkpd"
    return Path(args.workdir)


def parent(args: argparse.Namespace) -> None:
    """Each role's engine in turn; a role whose result file exists (same commit, same
    settings: a call cut off by its time limit) is not run again."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tdir = _transport(args)
    key = {"context": args.context, "chunk": args.chunk, "prompts": args.prompts,
           "smoke": args.smoke, "commit": env_info().get("commit")}
    runs: dict[str, Any] = {}
    for role in ROLES:
        js = work / f"pd-{role}.json"
        done = json.loads(js.read_text()) if js.is_file() else {}
        if done.get("key") == key:
            runs[role] = done
            print(f"[pd] {role}: from an earlier call: {runs[role]['wall_s']}", flush=True)
            continue
        pair = "pd-dense" if role.startswith("dense") else "pd-redknot"
        if role.endswith("producer"):
            shutil.rmtree(tdir / pair, ignore_errors=True)
            (tdir / pair).mkdir(parents=True)
        cmd = [sys.executable, __file__, "--child", "--role", role, "--json-out", str(js),
               "--workdir", str(work), "--transport-dir", str(tdir), "--context",
               str(args.context), "--chunk", str(args.chunk), "--prompts", str(args.prompts),
               *(["--smoke"] if args.smoke else [])]
        rc = subprocess.run(cmd, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
                            ).returncode
        if rc != 0:
            raise SystemExit(f"[pd] {role} failed (rc {rc})")
        run = json.loads(js.read_text())
        run["key"] = key
        if role.endswith("consumer"):
            # the pair's files, measured once its consumer has read them; then freed
            # (the dense pair's are ~4 GB a prompt in host memory)
            run["bytes_moved_total"] = _folder_bytes(tdir / pair)
            run["transport_dir"] = str(tdir / pair)
            shutil.rmtree(tdir / pair, ignore_errors=True)
        js.write_text(json.dumps(run))
        runs[role] = run
        print(f"[pd] {role}: {runs[role]['wall_s']}", flush=True)
    med = {r: {n: statistics.median(v) for n, v in x["wall_s"].items()} for r, x in
           runs.items()}
    n_prompts = 1 + args.prompts
    loaded = all(c >= args.context - 1 for c in runs["redknot_consumer"]["num_cached_tokens"])
    first = runs["colocated"]
    doc = {
        **{k: first.get(k) for k in ("device", "driver", "vllm", "torch", "commit")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "random-weight Llama-3.1-8B shape" + (" (smoke: tiny widths)" if args.smoke
                                                       else ""),
        "config": {"head_config": HEAD_CONFIG, "context": args.context, "chunk": args.chunk,
                   "max_num_seqs": MAX_NUM_SEQS,
                   "prompts": args.prompts, "dense_pd": "vLLM ExampleConnector (every head)",
                   "redknot_pd": "RedKnot connector, pd roles, SegPaged"},
        "bytes_moved": {"dense_pd": runs["dense_consumer"]["bytes_moved_total"] / n_prompts,
                        "redknot_pd": runs["redknot_consumer"]["bytes_moved_total"] / n_prompts},
        "transport": runs["redknot_consumer"]["transport_dir"],
        "ttft_s": {"colocated": med["colocated"]["1"],
                   "dense_pd": med["dense_producer"]["1"],
                   "redknot_pd": med["redknot_producer"]["1"]},
        "ttft_plus_first_decode_s": {
            "colocated": med["colocated"]["2"],
            "dense_pd": med["dense_producer"]["1"] + med["dense_consumer"]["2"],
            "redknot_pd": med["redknot_producer"]["1"] + med["redknot_consumer"]["2"]},
        "redknot_consumer_loaded_every_prompt": loaded,
        "fallback_tested": "tests/test_pd.py (CPU): missing and corrupt transfers computed",
        "runs": runs,
    }
    b = doc["bytes_moved"]
    doc["bytes_ratio_dense_over_redknot"] = b["dense_pd"] / b["redknot_pd"] if b[
        "redknot_pd"] else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("bytes_moved", "bytes_ratio_dense_over_redknot",
                                          "ttft_plus_first_decode_s",
                                          "redknot_consumer_loaded_every_prompt")}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pd-h200.json"))
    ap.add_argument("--workdir", default="/tmp/rkpd")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--transport-dir", help="the shared folder (default: /dev/shm/rkpd when "
                    "it has room, else --workdir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
