"""The docs describe the code that exists: the module map of ``docs/design.md`` names every
module of the package, and every file path the docs and README name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "redknot_vllm"
_PATH = re.compile(r"`([\w.-]+(?:/[\w.-]+)+/?)`")


def _module_map() -> list[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("### Module map"):]
    table = table[:table.index("\n\n", table.index("|"))]
    entries = []
    for line in table.splitlines():
        if line.startswith("| `"):
            cell = line.split("|")[1]
            entries += re.findall(r"`([^`]+)`", cell.split("(")[0])
    return entries


def test_module_map_covers_every_module():
    entries = [e.split(" ")[0] for e in _module_map()]
    modules = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
               if p.name != "__init__.py"]
    modules += [f"kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")
                if p.name != "__init__.py"]
    missing = [m for m in modules
               if m not in entries and not any(e.endswith("/") and m.startswith(e)
                                               for e in entries)]
    assert not missing, f"docs/design.md's module map does not name {missing}"
    gone = [e for e in entries if not ((PKG / e).exists() or (ROOT / e).exists())]
    assert not gone, f"docs/design.md's module map names missing modules {gone}"


def test_paths_named_in_docs_exist():
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in _PATH.findall(doc.read_text()):
            if "<" in path or "*" in path or path.startswith(("~", "/")):
                continue
            if not any((base / path).exists() for base in (ROOT, PKG, ROOT / "benchmarks",
                                                   ROOT / "benchmarks" / "results")):
                missing.append(f"{doc.name}: {path}")
    assert not missing, f"paths named in the docs that do not exist: {missing}"
