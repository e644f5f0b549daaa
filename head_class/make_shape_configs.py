"""Write the shipped "shape" head configs (stated proportions, not profiled).

Run from the repository root: ``python head_class/make_shape_configs.py``. Profiled
configs (``redknot profile``) replace these as they land.
"""

from __future__ import annotations

import json
from pathlib import Path

from redknot_vllm.head_config import HeadConfig

HERE = Path(__file__).parent

SHAPES = {
    # The demo / CPU-test config: 80% local heads on SmolLM2-135M-Instruct (30 x 3 KV heads).
    "smollm2-135m-instruct.shape80.json": dict(
        num_layers=30, num_kv_heads=3, global_fraction=0.2, window=1024, sink=4,
        dense_prefix_layers=0, seed=0,
        info={"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "architecture": "LlamaForCausalLM",
              "notes": "shape config: 20% of all KV heads global, chosen by a seeded "
                       "shuffle; not profiled"}),
    # The GPU speed benchmark's random-weight Llama-3.1-8B shape: exactly 1 of 8 KV heads
    # global in every layer, W=4096 (the configuration measured-baselines.md ceilings use).
    "llama-3.1-8b.shape-g1of8-w4096.json": dict(
        num_layers=32, num_kv_heads=8, global_fraction=0.125, window=4096, sink=4,
        dense_prefix_layers=0, seed=0, per_layer=True,
        info={"model": "random-weight Llama-3.1-8B shape (benchmarks/ttft.py)",
              "architecture": "LlamaForCausalLM",
              "notes": "shape config for speed runs: 1 global KV head per layer, chosen by a "
                       "seeded draw; not profiled, no quality claim"}),
}

SPARSE_FFN = {
    "smollm2-135m-instruct.sparse_ffn.json": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "notes": "the best of the three sparse-FFN schedules swept on H100 on top of the "
                 "quality default head config (benchmarks/results/quality-sweep-smollm2.json: "
                 "average ratio 0.76 against 0.96 without it, 22% against 16% of prefill FLOPs "
                 "saved at 8K); not part of the quality default, which runs the FFN dense; "
                 "used by the demo and speed runs",
        "dense_until": 20, "mass_thresh": 0.5, "recent_n": 128, "min_keep": 1,
    },
    "llama-3.1-8b.sparse_ffn-15pct.json": {
        "model": "random-weight Llama-3.1-8B shape (benchmarks/ttft.py)",
        "notes": "speed runs only: the first 5 layers dense as in the kernel ceilings, the top "
                 "15% of tokens by importance in the others (keep_fraction: on random weights "
                 "a mass threshold gives a length-dependent share, so the share is fixed)",
        "dense_until": 5, "keep_fraction": 0.15, "recent_n": 1, "min_keep": 1,
    },
}


def main() -> None:
    for name, kw in SHAPES.items():
        HeadConfig.shape(**kw).save_json(HERE / name)
    for name, params in SPARSE_FFN.items():
        (HERE / name).write_text(json.dumps(params, indent=1) + "\n")


if __name__ == "__main__":
    main()
