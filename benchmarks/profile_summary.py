"""Group a torch.profiler table (from ``ttft.py --profile-len``) into per-layer categories."""

from __future__ import annotations

import sys

CATEGORIES = [
    ("FlashAttn", "FA3 attention kernels"),
    ("nvjet", "cuBLAS GEMMs (QKV, O, dense-layer MLPs, LM head)"),
    ("gemm", "grouped GEMM (sparse MLP)"),
    ("sink_merge", "sink merge (Triton)"),
    ("Command Buffer", "launch-queue stalls (Command Buffer Full)"),
    ("rms_norm", "RMSNorm"),
    ("silu", "SiLU*mul"),
    ("index_select_mul_split", "RoPE"),
    ("reshape_and_cache", "KV-cache write"),
]
OPS = ("aten::", "vllm::", "_vllm_fa3_C::", "_C_cache_ops::")


def summarize(path: str, layers: int = 32) -> str:
    lines = [ln for ln in open(path).read().split("\n") if not ln.startswith("# ")]
    totals: dict[str, float] = {}
    seen: set[tuple[str, str]] = set()
    for line in lines[4:]:
        parts = line.split()
        if len(parts) < 11 or parts[-5].startswith("-"):
            continue
        name, val = " ".join(parts[:-10]), parts[-5]
        if name.startswith(OPS) or (name, val) in seen:  # op rows repeat their kernels
            continue
        seen.add((name, val))
        ms = float(val[:-2]) / 1000 if val.endswith("us") else float(val[:-2])
        cat = next((c for key, c in CATEGORIES if key in name),
                   "token selection, sorts, gathers/scatters, fills (small kernels)")
        totals[cat] = totals.get(cat, 0.0) + ms
    out = [lines[0], "", "| category | total ms | ms per layer |", "|---|---|---|"]
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        out.append(f"| {cat} | {ms:.1f} | {ms / layers:.2f} |")
    out.append(f"| **sum** | {sum(totals.values()):.1f} | {sum(totals.values()) / layers:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"`{p}`\n\n{summarize(p)}\n")
