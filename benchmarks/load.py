"""Load on the OpenAI server: dense ``vllm serve`` vs RedKnot ``vllm serve``, same run.

    python benchmarks/load.py --model qwen2.5-coder-0.5b --out results/load-h200.json

Both servers are started with the README's own command (``python -m
vllm.entrypoints.cli.main serve`` is what the ``vllm`` script runs; the offline GPU bundle
installs no console scripts), the RedKnot one with the plugin's flags, a head config and
offline KV reuse on, its documents stored first with ``redknot precompute``. Each gets the
same ``--requests`` requests at once (seeded): prompts of 1K-32K tokens, a quarter built
from stored documents, some with malformed RedKnot parameters (which must run as if they
had none) and some malformed bodies (which must get a 4xx). Every request has a deadline;
one that misses it is a hang. Latency is the wall clock of each successful completion.
After the load the server must still answer ``/health``.
"""

from __future__ import annotations

import argparse
import asyncio
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

from ttft import env_info  # noqa: E402

LENGTHS = (1024, 2048, 4096, 8192, 16384, 31744)
DOC_TOKENS = 1000
QUESTION = "\nQuestion: which document above mentions the largest number? Answer:"
HOSTILE_PARAMS: list[Any] = [
    {"redknot": {"probe": {"digest": "x", "offset": 1}}},
    {"redknot": {"probe": {"digest": "ab" * 32, "offset": 100000}}},
    {"redknot": {"reuse": [[0, 10 ** 9]]}},
    {"redknot": {"reuse": [[i, i + 1] for i in range(100000)]}},
    {"redknot": {"store": True}},
    {"redknot": {"recompute_fraction": 1e308}},
    {"redknot": {"reuse": [[5, 2]]}},
    {"redknot": "everything"},
    ["not", "an", "object"],
    {"redknot": {"reuse": "auto", "recompute_fraction": -1}},
    {"redknot": {"nope": 1}},
    {"redknot": {"probe": {"digest": "0" * 64, "offset": True}}},
]
BAD_BODIES: list[dict[str, Any]] = [
    {"max_tokens": -1},
    {"prompt": None},
    {"temperature": "hot"},
    {"max_tokens": 10 ** 9},
    {"logprobs": 10 ** 6},
    {"n": 0},
]


def _model_path(name: str) -> str:
    from redknot_vllm.registry import resolve_model

    return resolve_model(name)


def build_requests(tok: Any, n: int, docs: list[list[int]], seed: int,
                   max_model_len: int) -> list[dict[str, Any]]:
    """``n`` request descriptions: kind, prompt token ids, body overrides."""
    rng = random.Random(seed)
    filler = tok.encode(" The river moved slowly under the stone bridge, carrying leaves.",
                        add_special_tokens=False)
    q = tok.encode(QUESTION, add_special_tokens=False)
    out = []
    for i in range(n):
        length = min(rng.choice(LENGTHS), max_model_len - 64)
        kind = ("docs" if i % 4 == 0 else "hostile" if i % 16 == 1 else
                "bad_body" if i % 32 == 3 else "plain")
        if kind == "docs":
            ids: list[int] = []
            for d in rng.sample(docs, len(docs)):
                if len(ids) + len(d) + len(q) > length:
                    break
                ids += d
            ids += q
        else:
            body = [t for _ in range(length // len(filler) + 1) for t in filler]
            ids = body[:length - len(q)] + q
        req: dict[str, Any] = {"kind": kind, "tokens": len(ids), "prompt": ids}
        if kind == "hostile":
            req["kv_transfer_params"] = HOSTILE_PARAMS[(i // 16) % len(HOSTILE_PARAMS)]
        if kind == "bad_body":
            req["body"] = BAD_BODIES[(i // 32) % len(BAD_BODIES)]
        out.append(req)
    return out


def make_docs(tok: Any, count: int, seed: int) -> list[list[int]]:
    """Documents of about ``DOC_TOKENS`` tokens, each with one distinctive number."""
    from redknot_vllm.quality import FILLER_SENTENCES

    rng = random.Random(f"load-docs/{seed}")
    docs = []
    for i in range(count):
        words = f"Document {i}. The registry number of item {i} is {rng.randint(10**5, 10**6)}."
        ids = tok.encode(words, add_special_tokens=False)
        while len(ids) < DOC_TOKENS:
            ids += tok.encode(" " + rng.choice(FILLER_SENTENCES), add_special_tokens=False)
        docs.append(ids[:DOC_TOKENS])
    return docs


async def _one(client: Any, model: str, req: dict[str, Any], deadline: float
               ) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": req["prompt"], "max_tokens": 16,
                            "temperature": 0}
    if "kv_transfer_params" in req:
        body["kv_transfer_params"] = req["kv_transfer_params"]
    body.update(req.get("body", {}))
    t0 = time.perf_counter()
    try:
        r = await asyncio.wait_for(client.post("/v1/completions", json=body), deadline)
        status = r.status_code
        text = r.json()["choices"][0]["text"] if status == 200 else r.text[:300]
    except asyncio.TimeoutError:
        status, text = None, "deadline"
    except Exception as e:  # connection reset: the server died
        status, text = -1, f"{type(e).__name__}: {e}"[:300]
    return {"kind": req["kind"], "tokens": req["tokens"], "status": status,
            "latency_s": time.perf_counter() - t0, "text": text}


async def _load(port: int, model: str, reqs: list[dict[str, Any]], deadline: float
                ) -> list[dict[str, Any]]:
    import httpx

    limits = httpx.Limits(max_connections=len(reqs), max_keepalive_connections=len(reqs))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits,
                                 timeout=httpx.Timeout(deadline + 30)) as client:
        return await asyncio.gather(*(_one(client, model, r, deadline) for r in reqs))


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s")


def serve_cmd(model: str, port: int, max_model_len: int, redknot: dict[str, Any] | None
              ) -> list[str]:
    """The README's ``vllm serve`` command (RedKnot flags when ``redknot`` is given)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
           "--port", str(port), "--max-model-len", str(max_model_len),
           "--served-model-name", "m", "--gpu-memory-utilization", "0.85"]
    if redknot is None:
        return cmd
    from redknot_vllm import engine_args

    args = engine_args(model, **redknot)
    return cmd + ["--hf-overrides", json.dumps(args["hf_overrides"]),
                  "--additional-config", json.dumps(args["additional_config"]),
                  "--kv-transfer-config", json.dumps(args["kv_transfer_config"]),
                  "--worker-extension-cls", args["worker_extension_cls"]]


def run_server(name: str, cmd: list[str], port: int, reqs: list[dict[str, Any]],
               deadline: float, log: Path) -> dict[str, Any]:
    print(f"[load] {name}: starting {' '.join(cmd[:6])} ...", flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        start_s = _wait_healthy(port, proc, 300)
        t0 = time.perf_counter()
        results = asyncio.run(_load(port, "m", reqs, deadline))
        wall = time.perf_counter() - t0
        alive = proc.poll() is None
        try:
            import httpx

            healthy = alive and httpx.get(f"http://127.0.0.1:{port}/health",
                                          timeout=10).status_code == 200
        except Exception:
            healthy = False
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"[load] {name}: {wall:.1f} s for {len(reqs)} requests, alive after: {healthy}",
          flush=True)
    return {"start_s": start_s, "wall_s": wall, "alive_after": healthy, "requests": results}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    res = run["requests"]
    ok = [r for r in res if r["status"] == 200]
    lat = sorted(r["latency_s"] for r in ok)

    def pct(p: float) -> float | None:
        return None if not lat else lat[min(len(lat) - 1, round(p * (len(lat) - 1)))]

    return {"ok": len(ok),
            "client_errors": sum(1 for r in res if r["status"] and 400 <= r["status"] < 500),
            "server_errors": sum(1 for r in res if r["status"] and r["status"] >= 500),
            "connection_errors": sum(1 for r in res if r["status"] == -1),
            "hangs": sum(1 for r in res if r["status"] is None),
            "p50": pct(0.5), "p99": pct(0.99),
            "mean": statistics.mean(lat) if lat else None,
            "bad_bodies_rejected": sum(1 for r in res if r["kind"] == "bad_body"
                                       and r["status"] and 400 <= r["status"] < 500),
            "alive_after": run["alive_after"], "wall_s": run["wall_s"],
            "start_s": run["start_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--head-config", default=None,
                    help="default: a shape config, half the KV heads global, W=2048")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--docs", type=int, default=64, help="stored documents")
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--servers", default="dense,redknot",
                    help="which servers to run, in order (a diagnostic run may take one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/load-h200.json"))
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from redknot_vllm import HeadConfig
    from redknot_vllm.dims import ModelDims

    model = _model_path(a.model)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="redknot-load-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model)
    dims = ModelDims.from_hf_config(json.loads((Path(model) / "config.json").read_text()))
    head = a.head_config
    if head is None:
        head = str(work / "head.json")
        HeadConfig.shape(dims.num_layers, dims.num_kv_heads, 0.5, 2048, seed=0).save_json(head)
    docs = make_docs(tok, a.docs, a.seed)
    (work / "docs.jsonl").write_text("".join(json.dumps({"token_ids": d}) + "\n" for d in docs))
    store = work / "kv-segments"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "redknot_vllm.cli", "precompute", "--model", model,
                    "--docs", str(work / "docs.jsonl"), "--head-config", head,
                    "--store-dir", str(store), "--max-model-len", str(a.max_model_len),
                    "--gpu-memory-utilization", "0.5", "--enforce-eager"], check=True,
                   stdout=(work / "precompute.log").open("w"), stderr=subprocess.STDOUT)
    precompute_s = time.perf_counter() - t0
    reqs = build_requests(tok, a.requests, docs, a.seed, a.max_model_len)
    runs: dict[str, Any] = {}
    rk = {"head_config": head, "reuse": {"store_dir": str(store)}}
    for name in a.servers.split(","):
        redknot = {"dense": None, "redknot": rk}[name]
        runs[name] = run_server(name, serve_cmd(model, a.port, a.max_model_len, redknot),
                                a.port, reqs, a.deadline, work / f"{name}.log")
        write(a, model, work, head, docs, rk, reqs, runs, precompute_s)


def write(a: argparse.Namespace, model: str, work: Path, head: str, docs: list[list[int]],
          rk: dict[str, Any], reqs: list[dict[str, Any]], runs: dict[str, Any],
          precompute_s: float) -> None:
    """The result file, written after each server (a run cut short keeps what it has)."""
    from redknot_vllm import HeadConfig

    summary = {k: summarize(v) for k, v in runs.items()}
    log = work / "redknot.log"
    rk_log = log.read_text(errors="replace") if "redknot" in runs else ""
    doc = {
        **env_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": a.model,
        "command": {"dense": serve_cmd(model, a.port, a.max_model_len, None)[1:],
                    "redknot": serve_cmd(model, a.port, a.max_model_len, rk)[1:]},
        "config": {"head_config": HeadConfig.from_json(head).summary(),
                   "reuse": rk["reuse"], "stored_documents": len(docs),
                   "document_tokens": DOC_TOKENS, "precompute_s": precompute_s,
                   "deadline_s": a.deadline, "max_tokens": 16, "seed": a.seed,
                   "lengths": list(LENGTHS)},
        "requests": a.requests,
        "mix": {k: sum(1 for r in reqs if r["kind"] == k)
                for k in ("plain", "docs", "hostile", "bad_body")},
        "ok": {k: v["ok"] for k, v in summary.items()},
        "client_errors": {k: v["client_errors"] for k, v in summary.items()},
        "server_errors": {k: v["server_errors"] for k, v in summary.items()},
        "hangs": {k: v["hangs"] for k, v in summary.items()},
        "latency_s": {k: {"p50": v["p50"], "p99": v["p99"], "mean": v["mean"]}
                      for k, v in summary.items()},
        "summary": summary,
        "redknot_log": {"requests_reusing": rk_log.count("reuses "),
                        "errors_logged": rk_log.count(" ERROR "),
                        "engine_dead": "EngineDeadError" in rk_log},
        "raw": {k: [{x: r[x] for x in ("kind", "tokens", "status", "latency_s")}
                    for r in v["requests"]] for k, v in runs.items()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("ok", "client_errors", "server_errors", "hangs",
                                          "latency_s", "redknot_log")}, indent=1))
    if os.environ.get("OUT"):
        for name in ("dense", "redknot", "precompute"):
            src = work / f"{name}.log"
            if src.exists():
                Path(os.environ["OUT"], f"load-{name}.log").write_text(
                    src.read_text(errors="replace")[-200000:])


if __name__ == "__main__":
    main()
