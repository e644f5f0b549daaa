"""Write the wider-window variants of the Qwen2.5-0.5B SegPaged proxy config.

Run from the repository root: ``python head_class/make_segpaged_windows.py``. Each variant
keeps the proxy's head selection (each layer's top-scored KV head global, the other local)
and only widens the local heads' window, so a quality run of the variants measures what
the window alone costs in SegPaged's decode (issue 15).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

HERE = Path(__file__).parent
BASE = "qwen2.5-coder-0.5b-instruct.segpaged-g1of2-w2048.json"
WINDOWS = (4096, 8192)


def variant(base: dict, window: int) -> dict:
    out = copy.deepcopy(base)
    out["kv_head_max_distance"] = [[window if d > 0 else d for d in row]
                                   for row in base["kv_head_max_distance"]]
    prov = out["provenance"]
    prov["parameters"] = {**prov["parameters"], "window": window}
    prov["derived_from"] = {"file": BASE, "change": f"local heads' window 2048 -> {window}; "
                            "the same heads global and local"}
    return out


def main() -> None:
    base = json.loads((HERE / BASE).read_text())
    for w in WINDOWS:
        path = HERE / BASE.replace("w2048", f"w{w}")
        path.write_text(json.dumps(variant(base, w), indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()
