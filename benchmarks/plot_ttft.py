"""Draw a TTFT results JSON (from ``ttft.py``) as a PNG next to it."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(path.read_text())
    rows = doc["results"]
    x = [r["tokens"] for r in rows]
    dense = [statistics.median(r["dense_ttft_s"]) for r in rows]
    rk = [statistics.median(r["redknot_ttft_s"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, dense, "o-", label="dense vLLM")
    a.plot(x, rk, "s-", label="RedKnot vLLM")
    a.set_xscale("log", base=2)
    a.set_xlabel("prompt tokens")
    a.set_ylabel("median TTFT (s)")
    a.legend()
    b.bar([str(t) for t in x], [r["speedup_median"] for r in rows])
    b.set_xlabel("prompt tokens")
    b.set_ylabel("TTFT speedup (dense / RedKnot)")
    fig.suptitle(f"{doc['model']} on {doc.get('device')}, vLLM {doc.get('vllm')}, "
                 f"commit {str(doc.get('commit'))[:8]}")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(plot(Path(p)))
