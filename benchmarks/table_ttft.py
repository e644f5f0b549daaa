"""Print the markdown results table of a ``ttft.py`` JSON (for docs/gpu.md)."""

from __future__ import annotations

import json
import statistics
import sys


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(path: str) -> str:
    d = json.load(open(path))
    out = [f"`{path}`: {d['model']} on {d['device']} (driver {d.get('driver')}), vLLM "
           f"{d['vllm']}, torch {d['torch']}, commit `{str(d['commit'])[:10]}`, {d['date']}",
           "",
           "| prompt tokens | dense TTFT (median s) | RedKnot TTFT (median s) | speedup | "
           "prefill FLOPs saved | FFN kept (all layers) | FFN kept (sparse layers) |",
           "|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        out.append(f"| {r['tokens']:,} | {statistics.median(r['dense_ttft_s']):.3f} | "
                   f"{statistics.median(r['redknot_ttft_s']):.3f} | "
                   f"{r['speedup_median']:.2f}x | {100 * r['flops_saved']:.1f}% | "
                   f"{100 * r['ffn_kept_fraction']:.1f}% | "
                   f"{_pct(r.get('ffn_kept_fraction_sparse_layers'))} |")
    dec = d["decode_tok_s"]
    out += ["", "| decode tok/s | dense | RedKnot | ratio |", "|---|---|---|---|"]
    for b in dec["dense"]:
        out.append(f"| batch {b} | {dec['dense'][b]:.1f} | {dec['redknot'][b]:.1f} | "
                   f"{dec['redknot'][b] / dec['dense'][b]:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
