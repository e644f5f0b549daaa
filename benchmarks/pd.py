"""Head-aware PD against vLLM's all-heads PD and the co-located engine, same run.

    python benchmarks/pd.py --out benchmarks/results/pd-h200.json

The random-weight Llama-3.1-8B shape, 1 of 8 KV heads global, W=4096 (the SegPaged
benchmark's config), prompts of ``--context`` tokens. Each engine in a subprocess of its own
(vLLM's KV connector is one per process). The co-located engine and the dense pair run one
after another (the ExampleConnector's files outlive their producer); the RedKnot pair runs
at once, each engine at ``PAIR_MEMORY`` of the GPU, the consumer started once the
producer is up, taking prompt after prompt as the producer sends them (``--transport
cuda_ipc``, the GPU default, keeps the KV in the producer's GPU memory until the consumer
copied it):

* ``colocated``: RedKnot + SegPaged, no PD: wall time of ``generate(max_tokens=2)`` (TTFT +
  the first decode step) and of ``max_tokens=1``;
* ``redknot_pd``: the producer sends each prompt (``max_tokens=1``), the consumer generates 2
  tokens from its transfer; bytes moved = the transfers' sizes (file or GPU buffer);
* ``dense_pd``: stock vLLM with its ``ExampleConnector`` (every head, every layer, one
  safetensors file per layer) as producer and consumer, the same way; it stores a prompt
  at its first step only, so these engines prefill a prompt in one step.

Disaggregated TTFT + first decode step = the producer's wall time + the consumer's (the
transfer is written inside the producer's step and read inside the consumer's; the
producer waits while the consumer runs, so neither slows the other). A warm-up
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
PAIR_MEMORY = 0.42
"""gpu_memory_utilization of each engine of the RedKnot pair (both on one GPU at once)."""
WAIT_S = 600.0
ROLES = ("colocated", "redknot_producer", "redknot_consumer", "dense_producer",
         "dense_consumer")


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _wait_for(path: Path, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"[pd] gave up waiting {WAIT_S:.0f} s for {what}")
        time.sleep(0.005)


def _transfer_bytes(folder: Path, params: dict[str, Any] | None) -> int:
    """The size of a RedKnot transfer: its file, or the GPU buffer its handle names."""
    tid = ((params or {}).get("redknot_pd") or {}).get("transfer_id", "")
    ipc = folder / f"{tid}.ipc.json"
    if ipc.is_file():
        return int(json.loads(ipc.read_text())["bytes"])
    f = folder / f"{tid}.safetensors"
    return f.stat().st_size if f.is_file() else 0


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
    role = args.role
    if role.startswith("redknot"):
        kw["gpu_memory_utilization"] = PAIR_MEMORY
    if args.smoke:
        model, extra = smoke_model(work)
        kw = {**kw, **extra, "max_model_len": args.context + 512}
        kw.pop("gpu_memory_utilization", None)
    tdir = Path(args.transport_dir)
    rk_dir, dense_dir = tdir / "pd-redknot", tdir / "pd-dense"
    sync = work / "pd-sync"
    if role.startswith("dense"):
        # vLLM's ExampleConnector stores a prompt at its first step only: the dense pair
        # prefills each prompt in one step, so every token's KV is stored and moved
        kw = dict(kw, model=model, max_num_batched_tokens=args.context + 512,
                  kv_transfer_config={
            "kv_connector": "ExampleConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(dense_dir)}})
    else:
        pd = None if role == "colocated" else {
            "role": role.removeprefix("redknot_"), "dir": str(rk_dir), "timeout_s": 30,
            "transport": args.transport}
        kw = engine_args(model, head_config=str(ROOT / HEAD_CONFIG), require_gate=False,
                         segpaged=True, pd=pd, **kw)
    llm = LLM(**kw)
    if role == "redknot_producer":
        (sync / "producer-up").write_text("")
    rng = random.Random(4321)  # the same prompts for every engine
    prompts = [[rng.randrange(100, VOCAB) for _ in range(args.context)]
               for _ in range(1 + args.prompts)]
    out: dict[str, Any] = {**env_info(), "role": role, "wall_s": {}, "transfers": []}
    for i, p in enumerate(prompts):
        extra: dict[str, Any] = {}
        n = 2
        if role in ("redknot_producer", "dense_producer"):
            n = 1
            if role == "redknot_producer":
                extra = {"kv_transfer_params": {"redknot_pd": {"send": True}}}
        elif role == "redknot_consumer":
            _wait_for(sync / f"sent-{i}.json", f"the producer's prompt {i}")
            extra = {"kv_transfer_params": json.loads((sync / f"sent-{i}.json").read_text())}
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=extra)
        t = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0]
        dt = time.perf_counter() - t
        out["transfers"].append(res.kv_transfer_params)
        if role == "redknot_producer":
            out.setdefault("transfer_bytes", []).append(
                _transfer_bytes(rk_dir, res.kv_transfer_params))
            (sync / f"sent-{i}.json").write_text(json.dumps(res.kv_transfer_params))
            _wait_for(sync / f"taken-{i}", f"the consumer's prompt {i}")
        elif role == "redknot_consumer":
            (sync / f"taken-{i}").write_text("")
        out.setdefault("num_cached_tokens", []).append(res.num_cached_tokens)
        if i:  # the first prompt warms the engine up
            out["wall_s"].setdefault(str(n), []).append(dt)
        if role == "colocated" and i:
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p)], SamplingParams(
                max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
            out["wall_s"].setdefault("1", []).append(time.perf_counter() - t)
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


def _cmd(args: argparse.Namespace, role: str, js: Path, tdir: Path) -> list[str]:
    return [sys.executable, __file__, "--child", "--role", role, "--json-out", str(js),
            "--workdir", args.workdir, "--transport-dir", str(tdir), "--context",
            str(args.context), "--chunk", str(args.chunk), "--prompts", str(args.prompts),
            "--transport", args.transport, *(["--smoke"] if args.smoke else [])]


def _run_pair(args: argparse.Namespace, roles: tuple[str, str], tdir: Path) -> None:
    """The RedKnot pair at once: the consumer starts when the producer's engine is up (two
    engines profiling GPU memory at the same time would each count the other's)."""
    work = Path(args.workdir)
    sync = work / "pd-sync"
    shutil.rmtree(sync, ignore_errors=True)
    sync.mkdir(parents=True)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    prod = subprocess.Popen(_cmd(args, roles[0], work / f"pd-{roles[0]}.json", tdir), env=env)
    cons = None
    try:
        while not (sync / "producer-up").exists():
            if prod.poll() is not None:
                raise SystemExit(f"[pd] {roles[0]} failed (rc {prod.returncode})")
            time.sleep(0.2)
        cons = subprocess.Popen(_cmd(args, roles[1], work / f"pd-{roles[1]}.json", tdir),
                                env=env)
        for role, proc in zip(roles[::-1], (cons, prod), strict=True):
            rc = proc.wait(timeout=WAIT_S * (2 + args.prompts))
            if rc != 0:
                raise SystemExit(f"[pd] {role} failed (rc {rc})")
    finally:
        for proc in (prod, cons):
            if proc is not None and proc.poll() is None:
                proc.kill()


def parent(args: argparse.Namespace) -> None:
    """Each role's engine in turn (the RedKnot pair at once); a role whose result file
    exists (same commit, same settings: a call cut off by its time limit) is not run
    again."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tdir = _transport(args)
    key = {"context": args.context, "chunk": args.chunk, "prompts": args.prompts,
           "smoke": args.smoke, "transport": args.transport,
           "commit": env_info().get("commit")}
    runs: dict[str, Any] = {}

    def done(role: str) -> dict[str, Any]:
        js = work / f"pd-{role}.json"
        d = json.loads(js.read_text()) if js.is_file() else {}
        return d if d.get("key") == key else {}

    for role in ROLES:
        if role in runs:
            continue
        pair_roles = (("redknot_producer", "redknot_consumer") if role.startswith("redknot")
                      else (role,))
        if all(done(r) for r in pair_roles):
            for r in pair_roles:
                runs[r] = done(r)
                print(f"[pd] {r}: from an earlier call: {runs[r]['wall_s']}", flush=True)
            continue
        pair = "pd-dense" if role.startswith("dense") else "pd-redknot"
        if role.endswith("producer"):
            shutil.rmtree(tdir / pair, ignore_errors=True)
            (tdir / pair).mkdir(parents=True)
        if len(pair_roles) == 2:
            _run_pair(args, pair_roles, tdir)  # type: ignore[arg-type]
        else:
            js = work / f"pd-{role}.json"
            rc = subprocess.run(_cmd(args, role, js, tdir),
                                env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
                                ).returncode
            if rc != 0:
                raise SystemExit(f"[pd] {role} failed (rc {rc})")
        for r in pair_roles:
            js = work / f"pd-{r}.json"
            run = json.loads(js.read_text())
            run["key"] = key
            if r == "dense_consumer":
                # the pair's files, measured once its consumer has read them; then freed
                # (the dense pair's are ~4 GB a prompt in host memory)
                run["bytes_moved_total"] = _folder_bytes(tdir / pair)
                run["transport_dir"] = str(tdir / pair)
            if r.endswith("consumer"):
                shutil.rmtree(tdir / pair, ignore_errors=True)
            js.write_text(json.dumps(run))
            runs[r] = run
            print(f"[pd] {r}: {runs[r]['wall_s']}", flush=True)
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
                   "redknot_pd": "RedKnot connector, pd roles, SegPaged, both engines at "
                   f"once at gpu_memory_utilization {PAIR_MEMORY}"},
        "bytes_moved": {"dense_pd": runs["dense_consumer"]["bytes_moved_total"] / n_prompts,
                        "redknot_pd": sum(runs["redknot_producer"]["transfer_bytes"]) /
                        n_prompts},
        "transport": {"dense_pd": runs["dense_consumer"]["transport_dir"],
                      "redknot_pd": args.transport + ("" if args.transport == "cuda_ipc"
                                                      else f" ({tdir / 'pd-redknot'})")},
        "ttft_s": {"colocated": med["colocated"]["1"],
                   "dense_pd": med["dense_producer"]["1"],
                   "redknot_pd": med["redknot_producer"]["1"]},
        "ttft_plus_first_decode_s": {
            "colocated": med["colocated"]["2"],
            "dense_pd": med["dense_producer"]["1"] + med["dense_consumer"]["2"],
            "redknot_pd": med["redknot_producer"]["1"] + med["redknot_consumer"]["2"]},
        "redknot_consumer_loaded_every_prompt": loaded,
        "fallback_tested": "tests/test_pd.py (CPU): missing and corrupt transfers computed; "
        "tests/test_cuda_ipc.py: a handle that cannot be opened or fails its checksum",
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
    ap.add_argument("--transport", choices=("file", "cuda_ipc"),
                    help="the RedKnot pair's pd.transport (default: cuda_ipc, file with "
                    "--smoke)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.transport = args.transport or ("file" if args.smoke else "cuda_ipc")
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
