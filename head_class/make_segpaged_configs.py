"""Write the variants of the Qwen2.5-0.5B SegPaged proxy config (issue 15).

Run from the repository root: ``python head_class/make_segpaged_configs.py``.

* ``-w4096`` / ``-w8192``: the proxy's head selection (each layer's top KV head by the
  combined score global, the other local) with a wider local window, so a quality run
  measures what the window alone costs in SegPaged's decode.
* ``-ret-w2048``: each layer's global head chosen by the *retrieval* scores alone (the
  attention mass that answer-predicting rows put on a needle, short and long profile).
  SegPaged decodes local heads over sinks + window, so a head that copies from far back
  while answering must be the global one; the combined score (max with prefix shift and
  edge mass) made the stronger retrieval head local in layers 7, 10, 17, 19, 20 and 21.
  Same profile, same window, same number of global heads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from redknot_vllm.profiler.classify import classify
from redknot_vllm.profiler.scores import CLASSIFY_PARAMS, ProfileScores

HERE = Path(__file__).parent
BASE = "qwen2.5-coder-0.5b-instruct.segpaged-g1of2-w2048.json"
WINDOWS = (4096, 8192)
STALE = ("globals_per_layer", "retrieval_fraction", "retrieval_blocks", "wide_fraction",
         "wide_window")
RETRIEVAL_ONLY = {"prefix_shift": 0.0, "edge_mass": 0.0, "edge_mass_long": 0.0,
                  "retrieval": 1.0, "retrieval_long": 1.0}


def window_variant(base: dict, window: int) -> dict:
    out = copy.deepcopy(base)
    out["kv_head_max_distance"] = [[window if d > 0 else d for d in row]
                                   for row in base["kv_head_max_distance"]]
    prov = out["provenance"]
    prov["parameters"] = {**prov["parameters"], "window": window}
    prov["derived_from"] = {"file": BASE, "change": f"local heads' window 2048 -> {window}; "
                            "the same heads global and local"}
    return out


def retrieval_variant(base: dict, base_path: Path) -> dict:
    scores = ProfileScores.from_head_config_json(base_path)
    for k in STALE:  # the base's own classification, which its scores carried along
        scores.params.pop(k, None)
    window = base["provenance"]["parameters"]["window"]
    hc = classify(scores, 0.0, window, sink=scores.sink, weights=RETRIEVAL_ONLY,
                  globals_per_layer=1)
    out = hc.to_dict()
    # the profile's own record (texts, dates, device) stays the base's; the classification
    # parameters are this one's
    prov = copy.deepcopy(base["provenance"])
    kept = {k: v for k, v in prov["parameters"].items()
            if k not in CLASSIFY_PARAMS and k not in STALE}
    prov["parameters"] = {**kept, **out["provenance"]["parameters"]}
    prov["derived_from"] = {"file": BASE, "change": "each layer's global head by the "
                            "retrieval scores alone (weights: retrieval, retrieval_long)"}
    out["provenance"] = prov
    return out


def main() -> None:
    base = json.loads((HERE / BASE).read_text())
    outs = {BASE.replace("w2048", f"w{w}"): window_variant(base, w) for w in WINDOWS}
    outs[BASE.replace("w2048", "ret-w2048")] = retrieval_variant(base, HERE / BASE)
    for name, cfg in outs.items():
        (HERE / name).write_text(json.dumps(cfg, indent=1) + "\n")
        print(HERE / name)


if __name__ == "__main__":
    main()
