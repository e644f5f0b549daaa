"""Head-class configuration: which (layer, KV head) is global, local, retrieval or dense.

Reads and writes the seed's JSON format (``num_layers``, ``num_kv_heads``,
``kv_head_classification`` [L][H], ``kv_head_max_distance`` [L][H], optional
``kv_head_sink_size`` [L][H], ``retrieval_top_p``, ``dense_prefix_layers``, and RedKnot's
``tail_full_tokens`` and ``retrieval_blocks``) and validates
it strictly: every error names the field, the layer and head, and what was expected.

Semantics per KV head (all query heads of a KV head share its class):

* ``global`` / ``dense``: full causal attention during prefill;
* ``retrieval``: with ``retrieval_blocks`` ``{"top_k": K, "block": R, "window": W}``,
  block-sparse: the prompt is cut into blocks of ``R`` positions; a query in block ``b``
  sees key block 0 (the sink block), the ``K`` key blocks before its window that score
  highest for block ``b``'s mean query (a Quest-style bound over each key block's
  per-channel min and max), and its window ``[b·R - W, p]``; a block with no more than
  ``K`` candidates sees its whole prefix. Without ``retrieval_blocks`` a retrieval head runs
  as global (the seed's top-p is not implemented, logged);
* ``local``: the sink tokens ``[0, sink)`` plus a sliding window of the last ``W``
  keys (``W`` = ``kv_head_max_distance``), i.e. position ``p`` sees
  ``[0, sink) ∪ [p - W + 1, p]``;
* layers ``< dense_prefix_layers`` are full whatever their matrix says;
* the last ``tail_full_tokens`` tokens of every prefill chunk attend fully on every head
  (for a prompt sent whole: its question, which then reaches all the context, as decode
  does).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from redknot_vllm.errors import RedKnotError

SCHEMA_VERSION = 1

DEFAULT_SINK_SIZE = 4
"""The seed's default when ``kv_head_sink_size`` is absent (logged when applied)."""
DEFAULT_RETRIEVAL_TOP_P = 0.9
POSITION_LIMIT = (1 << 31) - 1
"""Windows and sinks are positions: they must fit the kernels' int32 position arithmetic."""


class HeadClass(str, Enum):
    """Head classes, as the seed's JSON names them."""

    LOCAL = "local"
    GLOBAL = "global"
    RETRIEVAL = "retrieval"
    DENSE = "dense"


LEGACY_ALIASES: dict[str, HeadClass] = {
    "local_full": HeadClass.LOCAL,
    "limited": HeadClass.LOCAL,
    "streaming": HeadClass.LOCAL,
    "sink_dominant": HeadClass.LOCAL,
}

_REQUIRED_KEYS = ("num_layers", "num_kv_heads", "kv_head_classification", "kv_head_max_distance")
_OPTIONAL_KEYS = ("kv_head_sink_size", "retrieval_top_p", "dense_prefix_layers",
                  "tail_full_tokens", "retrieval_blocks")
_MATRIX_KEYS = ("kv_head_classification", "kv_head_max_distance", "kv_head_sink_size")
INFORMATIONAL_KEYS = frozenset(
    {
        "schema_version",
        "model",
        "architecture",
        "method",
        "rationale",
        "window",
        "sink_size",
        "front_full_layers",
        "summary",
        "notes",
        "description",
        "profiling_meta",
        "provenance",
        "full_attention_layers",
    }
)
"""Keys the seed's files carry for people, not for the loader; kept verbatim in ``info``."""


class HeadConfigError(RedKnotError, ValueError):
    """A head-class config that is malformed or does not fit the model."""


def _fail(source: str, msg: str) -> HeadConfigError:
    return HeadConfigError(f"head config {source}: {msg}")


@dataclass(frozen=True)
class HeadConfig:
    """A validated head-class map. Build it with :meth:`from_dict` / :meth:`from_json`."""

    num_layers: int
    """Decoder layers the map covers."""
    num_kv_heads: int
    """Total KV heads per layer (before tensor parallelism)."""
    classes: tuple[tuple[HeadClass, ...], ...]
    """``[num_layers][num_kv_heads]`` class as written (before ``dense_prefix_layers``)."""
    windows: tuple[tuple[int, ...], ...]
    """``[num_layers][num_kv_heads]`` local window W (> 0 for local heads, -1 otherwise)."""
    sinks: tuple[tuple[int, ...], ...]
    """``[num_layers][num_kv_heads]`` sink tokens kept by local heads."""
    retrieval_top_p: float = DEFAULT_RETRIEVAL_TOP_P
    """The seed's top-p for retrieval heads (not implemented; see ``retrieval_blocks``)."""
    dense_prefix_layers: int = 0
    """Layers ``< dense_prefix_layers`` are full regardless of ``classes``."""
    tail_full_tokens: int = 0
    """The last this many tokens of every prefill chunk attend fully on every head."""
    retrieval_blocks: RetrievalBlocks | None = None
    """Block-sparse retrieval heads' parameters; None: retrieval heads run as global."""
    source: str = "<dict>"
    """Where the config came from, for messages."""
    defaults_applied: tuple[str, ...] = ()
    """Optional fields that were absent and took the seed's default (logged at start-up)."""
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Informational keys (provenance, notes, ...) carried through unchanged."""

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_json(cls, path: str | Path) -> HeadConfig:
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise HeadConfigError(f"cannot read head config {path}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise HeadConfigError(f"head config {path} is not a JSON text file (undecodable "
                                  f"byte at offset {e.start}); pass a head-class JSON") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise HeadConfigError(
                f"head config {path} is not valid JSON (line {e.lineno}, column {e.colno}): "
                f"{e.msg}"
            ) from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> HeadConfig:
        """Validate the seed's JSON structure; raise :class:`HeadConfigError` on any defect."""
        if not isinstance(data, dict):
            raise _fail(source, f"expected a JSON object at top level, got {type(data).__name__}")
        unknown = sorted(
            k for k in data if k not in _REQUIRED_KEYS + _OPTIONAL_KEYS
            and k not in INFORMATIONAL_KEYS and not k.startswith("_")
        )
        if unknown:
            raise _fail(
                source,
                f"unknown key(s) {unknown}; expected {list(_REQUIRED_KEYS + _OPTIONAL_KEYS)} "
                f"plus informational keys {sorted(INFORMATIONAL_KEYS)} (or keys starting with '_')",
            )
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise _fail(source, f"missing required key(s) {missing}")
        num_layers = _positive_int(data["num_layers"], "num_layers", source)
        num_kv_heads = _positive_int(data["num_kv_heads"], "num_kv_heads", source)
        classes = _matrix(data["kv_head_classification"], "kv_head_classification",
                          num_layers, num_kv_heads, source, _parse_class)
        windows = _matrix(data["kv_head_max_distance"], "kv_head_max_distance",
                          num_layers, num_kv_heads, source, _parse_int)
        defaults: list[str] = []
        if "kv_head_sink_size" in data:
            sinks = _matrix(data["kv_head_sink_size"], "kv_head_sink_size",
                            num_layers, num_kv_heads, source, _parse_int)
        else:
            sinks = tuple((DEFAULT_SINK_SIZE,) * num_kv_heads for _ in range(num_layers))
            defaults.append(f"kv_head_sink_size={DEFAULT_SINK_SIZE}")
        for li in range(num_layers):
            for h in range(num_kv_heads):
                c, w, s = classes[li][h], windows[li][h], sinks[li][h]
                where = f"kv_head_max_distance[{li}][{h}]"
                if c is HeadClass.LOCAL and w <= 0:
                    raise _fail(source, f"{where} is {w} but layer {li} head {h} is 'local'; "
                                "a local head needs its window W > 0")
                if c is not HeadClass.LOCAL and w > 0:
                    raise _fail(source, f"{where} is {w} but layer {li} head {h} is "
                                f"'{c.value}'; use -1 (or 0) for non-local heads")
                if w > POSITION_LIMIT:
                    raise _fail(source, f"{where} is {w}; a window is a number of positions, "
                                f"at most {POSITION_LIMIT} (and the model's maximum)")
                sink_at = f"kv_head_sink_size[{li}][{h}]"
                if s < 0:
                    raise _fail(source, f"{sink_at} is {s}; expected >= 0")
                if s > POSITION_LIMIT:
                    raise _fail(source, f"{sink_at} is {s}; a sink is a number of positions, "
                                f"at most {POSITION_LIMIT} (and the model's maximum)")
                if c is HeadClass.LOCAL and s >= w:
                    raise _fail(source, f"{sink_at} is {s} but the window of layer {li} head "
                                f"{h} is {w}; the sink must be smaller than the window (a "
                                "head that keeps that much is a global head)")
        top_p = data.get("retrieval_top_p", DEFAULT_RETRIEVAL_TOP_P)
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise _fail(source, f"retrieval_top_p is {top_p!r}; expected a number in (0, 1]")
        dpl = data.get("dense_prefix_layers", 0)
        if isinstance(dpl, bool) or not isinstance(dpl, int) or not 0 <= dpl <= num_layers:
            raise _fail(source, f"dense_prefix_layers is {dpl!r}; expected an integer in "
                        f"[0, num_layers={num_layers}]")
        tail = data.get("tail_full_tokens", 0)
        if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail <= POSITION_LIMIT:
            raise _fail(source, f"tail_full_tokens is {tail!r}; expected an integer in [0, "
                        f"{POSITION_LIMIT}] (how many last prompt tokens attend fully)")
        rb = None if data.get("retrieval_blocks") is None else RetrievalBlocks.parse(
            data["retrieval_blocks"], source)
        info = {k: v for k, v in data.items() if k in INFORMATIONAL_KEYS or k.startswith("_")}
        return cls(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            classes=classes,
            windows=tuple(
                tuple(w if c is HeadClass.LOCAL else -1 for c, w in zip(cr, wr, strict=True))
                for cr, wr in zip(classes, windows, strict=True)
            ),
            sinks=sinks,
            retrieval_top_p=float(top_p),
            dense_prefix_layers=dpl,
            tail_full_tokens=tail,
            retrieval_blocks=rb,
            source=source,
            defaults_applied=tuple(defaults),
            info=info,
        )

    # ---------------------------------------------------------------- checking
    def validate_for_model(self, num_layers: int, num_kv_heads: int, tp_size: int = 1,
                           max_positions: int | None = None) -> None:
        """Check the map against the model's layer and KV-head counts, the TP size and (when
        known) its maximum positions, which bound every window and sink."""
        remedy = "regenerate it for this model with `redknot profile`"
        if self.num_layers != num_layers:
            raise _fail(self.source, f"num_layers is {self.num_layers} but the model has "
                        f"{num_layers} decoder layers; {remedy}")
        if self.num_kv_heads != num_kv_heads:
            raise _fail(self.source, f"num_kv_heads is {self.num_kv_heads} but the model has "
                        f"{num_kv_heads} KV heads per layer; {remedy}")
        if tp_size < 1:
            raise _fail(self.source, f"tensor parallel size {tp_size} must be >= 1")
        if num_kv_heads >= tp_size and num_kv_heads % tp_size:
            raise _fail(self.source, f"{num_kv_heads} KV heads cannot be split over "
                        f"tensor_parallel_size={tp_size}; use a TP size that divides "
                        f"{num_kv_heads}")
        if num_kv_heads < tp_size and tp_size % num_kv_heads:
            raise _fail(self.source, f"tensor_parallel_size={tp_size} is not a multiple of "
                        f"the {num_kv_heads} KV heads, so heads cannot be replicated evenly")
        if max_positions is None:
            return
        for li in range(self.num_layers):
            for h in range(self.num_kv_heads):
                w, s = self.windows[li][h], self.sinks[li][h]
                if w > max_positions:
                    raise _fail(self.source, f"kv_head_max_distance[{li}][{h}] is {w}, more than "
                                f"the model's {max_positions} positions; make that head global")
                if s > max_positions:
                    raise _fail(self.source, f"kv_head_sink_size[{li}][{h}] is {s}, more than "
                                f"the model's {max_positions} positions")

    # ----------------------------------------------------------------- queries
    def effective_class(self, layer: int, head: int) -> HeadClass:
        """Class used at run time: layers below ``dense_prefix_layers`` are dense."""
        if layer < self.dense_prefix_layers:
            return HeadClass.DENSE
        return self.classes[layer][head]

    def rank_kv_heads(self, tp_rank: int, tp_size: int) -> list[int]:
        """Global KV-head indices held by one TP rank (vLLM's Llama/Qwen sharding)."""
        if self.num_kv_heads >= tp_size:
            per = self.num_kv_heads // tp_size
            return list(range(tp_rank * per, (tp_rank + 1) * per))
        return [tp_rank // (tp_size // self.num_kv_heads)]

    def counts(self) -> dict[str, int]:
        """Number of KV heads per effective class, over the whole model."""
        out = {c.value: 0 for c in HeadClass}
        for li in range(self.num_layers):
            for h in range(self.num_kv_heads):
                out[self.effective_class(li, h).value] += 1
        return out

    def summary(self) -> str:
        """One line for the start-up log, derived from the data."""
        c = self.counts()
        total = self.num_layers * self.num_kv_heads
        local = [(self.windows[li][h], self.sinks[li][h])
                 for li in range(self.num_layers) for h in range(self.num_kv_heads)
                 if self.effective_class(li, h) is HeadClass.LOCAL]
        ws = sorted({w for w, _ in local})
        ss = sorted({s for _, s in local})
        return (f"{total} KV heads: {c['global']} global, {c['local']} local "
                f"(window {ws or '-'}, sink {ss or '-'}), {c['retrieval']} retrieval"
                + (f" (block-sparse: top {self.retrieval_blocks.top_k} blocks of "
                   f"{self.retrieval_blocks.block}, window {self.retrieval_blocks.window})"
                   if self.retrieval_blocks and c["retrieval"] else "")
                + f", {c['dense']} dense (dense_prefix_layers={self.dense_prefix_layers}"
                + (f", last {self.tail_full_tokens} prompt tokens full"
                   if self.tail_full_tokens else "") + ")")

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """The seed's JSON structure (loader keys first, then the informational ones)."""
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "dense_prefix_layers": self.dense_prefix_layers,
            "retrieval_top_p": self.retrieval_top_p,
            "kv_head_classification": [[c.value for c in row] for row in self.classes],
            "kv_head_max_distance": [list(row) for row in self.windows],
            "kv_head_sink_size": [list(row) for row in self.sinks],
        }
        if self.tail_full_tokens:  # only when set: configs without it keep their hash
            out["tail_full_tokens"] = self.tail_full_tokens
        if self.retrieval_blocks is not None:  # likewise
            out["retrieval_blocks"] = self.retrieval_blocks.to_dict()
        for k, v in self.info.items():
            out.setdefault(k, v)
        return out

    def content_hash(self) -> str:
        """sha256 over the fields that change behaviour (not provenance or notes)."""
        core = {k: v for k, v in self.to_dict().items()
                if k in _REQUIRED_KEYS + _OPTIONAL_KEYS}
        blob = json.dumps(core, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def save_json(self, path: str | Path) -> None:
        """Write the JSON with one matrix row per line (readable diffs)."""
        d = self.to_dict()
        rows = {k: d.pop(k) for k in _MATRIX_KEYS}
        text = json.dumps(d, indent=1)[:-2]
        for k, m in rows.items():
            body = ",\n".join("  " + json.dumps(r) for r in m)
            text += f',\n "{k}": [\n{body}\n ]'
        Path(path).write_text(text + "\n}\n")

    # ------------------------------------------------------------- generators
    @classmethod
    def shape(
        cls,
        num_layers: int,
        num_kv_heads: int,
        global_fraction: float,
        window: int,
        sink: int = DEFAULT_SINK_SIZE,
        dense_prefix_layers: int = 0,
        seed: int = 0,
        info: dict[str, Any] | None = None,
        per_layer: bool = False,
        tail_full_tokens: int = 0,
    ) -> HeadConfig:
        """A "shape" config with stated proportions, not a profiled one.

        ``round(global_fraction * heads)`` of the KV heads in the layers at or above
        ``dense_prefix_layers`` are global, chosen by a seeded shuffle; the rest are local.
        With ``per_layer`` the count is applied to every layer (e.g. exactly 1 of 8).
        Used for speed runs on random weights and as a placeholder until a profile exists.
        """
        if not 0.0 <= global_fraction <= 1.0:
            raise HeadConfigError(f"global_fraction is {global_fraction}; expected [0, 1]")
        rng = random.Random(seed)
        layers = range(dense_prefix_layers, num_layers)
        if per_layer:
            k = round(global_fraction * num_kv_heads)
            global_set = {(li, h) for li in layers
                          for h in rng.sample(range(num_kv_heads), k)}
        else:
            slots = [(li, h) for li in layers for h in range(num_kv_heads)]
            rng.shuffle(slots)
            global_set = set(slots[:round(global_fraction * len(slots))])
        classes = [["global" if li < dense_prefix_layers or (li, h) in global_set else "local"
                    for h in range(num_kv_heads)] for li in range(num_layers)]
        meta = {"method": "shape", "provenance": {
            "generator": "HeadConfig.shape", "global_fraction": global_fraction,
            "window": window, "sink": sink, "seed": seed, "per_layer": per_layer}}
        meta.update(info or {})
        return cls.from_dict({
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "dense_prefix_layers": dense_prefix_layers,
            "kv_head_classification": classes,
            "kv_head_max_distance": [[window if c == "local" else -1 for c in row]
                                     for row in classes],
            "kv_head_sink_size": [[sink] * num_kv_heads for _ in range(num_layers)],
            "tail_full_tokens": tail_full_tokens,
            **meta,
        }, source="<shape>")


@dataclass(frozen=True)
class RetrievalBlocks:
    """Block-sparse retrieval heads: ``top_k`` key blocks of ``block`` positions per query
    block, plus key block 0 and a ``window`` (see the module docstring)."""

    top_k: int
    block: int
    window: int

    @classmethod
    def parse(cls, v: Any, source: str) -> RetrievalBlocks:
        where = "retrieval_blocks"
        if not isinstance(v, dict) or set(v) != {"top_k", "block", "window"}:
            raise _fail(source, f"{where} is {v!r}; expected an object with exactly top_k, "
                        'block and window, e.g. {"top_k": 8, "block": 64, "window": 1024}')
        for k in ("top_k", "block", "window"):
            x = v[k]
            if isinstance(x, bool) or not isinstance(x, int) or not 0 < x <= POSITION_LIMIT:
                raise _fail(source, f"{where}.{k} is {x!r}; expected a positive integer")
        if v["block"] % 16:
            raise _fail(source, f"{where}.block is {v['block']}; it must be a multiple of 16 "
                        "(a block is a whole number of KV-cache pages)")
        if v["window"] % v["block"]:
            raise _fail(source, f"{where}.window is {v['window']}; it must be a multiple of "
                        f"block={v['block']}")
        return cls(v["top_k"], v["block"], v["window"])

    def to_dict(self) -> dict[str, int]:
        return {"top_k": self.top_k, "block": self.block, "window": self.window}


def _positive_int(v: Any, name: str, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _fail(source, f"{name} is {v!r}; expected a positive integer")
    return v


def _parse_class(v: Any) -> HeadClass:
    if isinstance(v, str):
        if v in LEGACY_ALIASES:
            return LEGACY_ALIASES[v]
        try:
            return HeadClass(v)
        except ValueError:
            pass
    raise ValueError(f"{v!r}; expected one of {[c.value for c in HeadClass]} "
                     f"(or a legacy alias {sorted(LEGACY_ALIASES)})")


def _parse_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r}; expected an integer")
    return v


def _matrix(v: Any, name: str, rows: int, cols: int, source: str, parse: Any) -> tuple:
    if not isinstance(v, list) or len(v) != rows:
        got = f"a list of {len(v)} rows" if isinstance(v, list) else type(v).__name__
        raise _fail(source, f"{name} must be a list of num_layers={rows} rows, got {got}")
    out = []
    for li, row in enumerate(v):
        if not isinstance(row, list) or len(row) != cols:
            got = f"{len(row)} entries" if isinstance(row, list) else type(row).__name__
            raise _fail(source, f"{name}[{li}] (layer {li}) must list num_kv_heads={cols} "
                        f"entries, got {got}")
        parsed = []
        for h, x in enumerate(row):
            try:
                parsed.append(parse(x))
            except ValueError as e:
                raise _fail(source, f"{name}[{li}][{h}] (layer {li}, head {h}) is {e}") from None
        out.append(tuple(parsed))
    return tuple(out)
