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
}

SPARSE_FFN = {
    "smollm2-135m-instruct.sparse_ffn.json": {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "notes": "hand-set placeholder until the profiler sweeps it: on SmolLM2 a sparse FFN "
                 "in layers < 20 broke exact pass-key copying even at mass_thresh 0.9",
        "dense_until": 20, "mass_thresh": 0.5, "recent_n": 128, "min_keep": 1,
    },
}


def main() -> None:
    for name, kw in SHAPES.items():
        HeadConfig.shape(**kw).save_json(HERE / name)
    for name, params in SPARSE_FFN.items():
        (HERE / name).write_text(json.dumps(params, indent=1) + "\n")


if __name__ == "__main__":
    main()
