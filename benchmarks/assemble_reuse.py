"""Assemble ``benchmarks/results/reuse-h200.json`` (issue 14's output) from the committed runs.

The speed and the quality halves of the H200 reuse measurements ran in different calls
(and sessions), so no single ``reuse.py`` invocation holds both. This copies their figures,
unchanged, into the issue's format and names the file each row comes from::

    python benchmarks/assemble_reuse.py            # writes benchmarks/results/reuse-h200.json
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def speed_rows(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    doc = json.loads(path.read_text())
    rows = [{"model": r["model"], "tokens": r["tokens"], "tier": r["tier"],
             "recompute_fraction": r["recompute_fraction"],
             "speedup_vs_dense_median": r["speedup_vs_dense_median"],
             "speedup_vs_prefix_cache_median": r["speedup_vs_prefix_cache_median"],
             "dense_ttft_s": r["dense_ttft_s"], "prefix_cache_ttft_s": r["prefix_cache_ttft_s"],
             "reuse_ttft_s": r["redknot_ttft_s"], "reused_tokens": r["reused_tokens"],
             "device": doc["device"], "commit": doc["commit"], "source": path.name}
            for r in doc["results"]]
    return doc, rows


def quality_rows_final(path: Path, doc_split: str) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    return [{**q, "doc_split": doc_split, "commit": doc["commit"], "source": path.name}
            for q in doc["quality"]]


def quality_rows_partial(path: Path, doc_split: str) -> list[dict[str, Any]]:
    """Rows of a quality engine's own file (gzipped under ``raw/``): a run cut off by the
    device time (its partial file) or one that finished without the speed engines."""
    doc = json.loads(gzip.decompress(path.read_bytes()))
    cut = doc["cases_done"] < doc["cases"]
    rows = []
    for name, f in doc["by_fraction"].items():
        frac, select = name.split("-", 1)
        for c in f["cells"]:
            rows.append({"model": Path(doc["model"]).name, "select": select,
                         "recompute_fraction": float(frac), "task": c["task"],
                         "tokens": c["tokens"], "n": c["n"], "dense_acc": c["dense_acc"],
                         "reuse_acc": c["redknot_acc"], "ratio": c["ratio"],
                         "doc_split": doc_split, "commit": doc["commit"],
                         **({"device": doc["device"]} if "device" in doc else {}),
                         "source": f"raw/{path.name}" + (
                             f" (cut off after {doc['cases_done']} of {doc['cases']} cases)"
                             if cut else "")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "reuse-h200.json"))
    a = ap.parse_args()
    speed, rows = speed_rows(RESULTS / "reuse-qwen05shape-h200.json")
    rows += speed_rows(RESULTS / "reuse-llama8b-64k-h100.json")[1]
    quality = (quality_rows_final(RESULTS / "reuse-quality-qwen05-h200.json", "fixed 1024")
               + quality_rows_partial(RESULTS / "raw/reuse-quality-qwen05-records-h200.partial"
                                      ".json.gz", "records"))
    for r in quality:
        r.setdefault("device", speed["device"])  # the two H200 quality runs
    context = "records, stored behind reuse.store_context (1,024 tokens of a case of the task)"
    quality += [row for task in ("mdqa", "code") for row in quality_rows_partial(
        RESULTS / f"raw/reuse-quality-qwen05-store-context-{task}-h100.json.gz", context)]
    doc = {key: speed[key] for key in ("device", "driver", "vllm", "torch", "commit", "date")}
    doc.update({
        "policy": speed["policy"],
        "config": speed["config"],
        "results": rows,
        "results_note": "Qwen2.5-Coder-0.5B's shape with random weights (speed does not "
                        "depend on the weights); dense and the prefix-cache hit are stock vLLM "
                        "in the same run. The 8B shape at 64K ran on an H100 (its row's "
                        "device; the H200 had no machine that session), dense and the "
                        "prefix-cache hit on the same GPU in the same call; the tree that ran "
                        "was 33564cc, though the file records fbde190 (raw/device-calls-"
                        "2026-12-07-33564cc.provenance.json); other 8B figures: "
                        "reuse-h100.json.",
        "quality": quality,
        "quality_note": "Qwen2.5-Coder-0.5B real weights, reuse before dense in the same "
                        "engine, every head global. 'fixed 1024': contexts cut every 1,024 "
                        "tokens (n = 80 per cell); 'records': each record or source file one "
                        "segment (n = 35 per cell, a run cut off by the device time); 'records, "
                        "stored behind reuse.store_context': each document computed behind "
                        "1,024 tokens of a case of its task drawn with another seed and stored "
                        "without them (H100, each row's device; one engine per task, n = 100 "
                        "per cell for multidoc_qa_many, 50 for code_lookup).",
    })
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}: {len(rows)} speed rows, {len(quality)} quality rows")


if __name__ == "__main__":
    main()
