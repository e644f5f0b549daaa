"""RedKnot configuration: parsed once from vLLM's ``additional_config["redknot"]``.

Configuration travels through vLLM's own channels so that every process (API server,
engine core, workers, Ray actors) sees the same thing:

* ``hf_overrides={"architectures": ["RedKnot<Arch>"]}`` selects the RedKnot model class;
* ``additional_config={"redknot": {...}}`` carries the head-class map and the sparse-FFN
  schedule, inline (so remote workers need no files);
* ``kv_transfer_config`` names the RedKnot connector, which maps batch rows to request ids
  for per-request accounting.

:func:`engine_args` builds all three for ``LLM(...)``; ``redknot serve`` does the same for
the OpenAI server.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

from redknot_vllm.architectures import ARCHITECTURES, redknot_names
from redknot_vllm.dims import ModelDims
from redknot_vllm.errors import RedKnotError
from redknot_vllm.head_config import POSITION_LIMIT, HeadConfig

logger = init_logger(__name__)

REDKNOT_KEY = "redknot"

CONNECTOR_NAME = "RedKnotConnector"
CONNECTOR_MODULE = "redknot_vllm.connector"
WORKER_EXTENSION = "redknot_vllm.worker_extension.RedKnotWorkerExtension"


class RedKnotConfigError(RedKnotError, ValueError):
    """A RedKnot option that is unknown or out of range."""


_SPARSE_KEYS = ("dense_until", "mass_thresh", "keep_fraction", "deep_layer_start",
                "mass_thresh_deep", "recent_n", "min_keep")
_SPARSE_INFO_KEYS = frozenset({"model", "notes", "description", "provenance", "local_window",
                               "schema_version"})


@dataclass(frozen=True)
class SparseFFNConfig:
    """Token-sparse FFN schedule, in the seed's ``sparse_ffn_params`` format."""

    mass_thresh: float | None = None
    """Keep top tokens whose cumulative importance share stays below this (mid layers)."""
    keep_fraction: float | None = None
    """Instead of ``mass_thresh``: keep the top ``ceil(keep_fraction * n)`` tokens of each
    chunk. A control for speed runs (a fixed share of FFN work), not the seed's rule."""
    dense_until: int = 5
    """Layers ``< dense_until`` run the FFN on every token."""
    deep_layer_start: int | None = None
    """From this layer on, ``mass_thresh_deep`` applies (None: never)."""
    mass_thresh_deep: float | None = None
    """Threshold for deep layers; None means ``mass_thresh`` everywhere."""
    recent_n: int = 128
    """The last ``recent_n`` tokens of each scheduled prompt chunk always run the FFN."""
    min_keep: int = 1
    """At least this many top tokens per sequence run the FFN."""
    source: str = "<dict>"

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, want: str) -> RedKnotConfigError:
            return RedKnotConfigError(
                f"sparse_ffn {self.source}: {field} is {value!r}; expected {want}")

        if (self.mass_thresh is None) == (self.keep_fraction is None):
            raise RedKnotConfigError(
                f"sparse_ffn {self.source}: set exactly one of mass_thresh and keep_fraction "
                f"(got {self.mass_thresh!r} and {self.keep_fraction!r})")
        for name in ("mass_thresh", "keep_fraction"):
            v = getattr(self, name)
            if v is not None and (not is_number(v) or not 0 < v <= 1):
                raise bad(name, v, "a number in (0, 1]")
        if self.keep_fraction is not None and self.mass_thresh_deep is not None:
            raise RedKnotConfigError(f"sparse_ffn {self.source}: mass_thresh_deep needs "
                                     "mass_thresh, not keep_fraction")
        if self.mass_thresh_deep is not None and (
                not is_number(self.mass_thresh_deep) or not 0 < self.mass_thresh_deep <= 1):
            raise bad("mass_thresh_deep", self.mass_thresh_deep, "null or a number in (0, 1]")
        for name in ("dense_until", "recent_n"):
            v = getattr(self, name)
            if not is_int(v) or not 0 <= v <= POSITION_LIMIT:
                raise bad(name, v, f"an integer in [0, {POSITION_LIMIT}]")
        if not is_int(self.min_keep) or not 1 <= self.min_keep <= POSITION_LIMIT:
            raise bad("min_keep", self.min_keep, f"an integer in [1, {POSITION_LIMIT}]")
        if self.deep_layer_start is not None and (
                not is_int(self.deep_layer_start)
                or not 0 <= self.deep_layer_start <= POSITION_LIMIT):
            raise bad("deep_layer_start", self.deep_layer_start, "null or an integer >= 0")
        if (self.mass_thresh_deep is None) != (self.deep_layer_start is None):
            raise RedKnotConfigError(
                f"sparse_ffn {self.source}: deep_layer_start and mass_thresh_deep go together "
                f"(got {self.deep_layer_start!r} and {self.mass_thresh_deep!r})")

    @property
    def by_fraction(self) -> bool:
        """True when the rule is ``keep_fraction`` rather than cumulative mass."""
        return self.keep_fraction is not None

    def threshold(self, layer: int) -> float:
        """The layer's mass threshold (or keep fraction); 1.0 means dense."""
        if layer < self.dense_until:
            return 1.0
        if self.keep_fraction is not None:
            return self.keep_fraction
        if self.deep_layer_start is not None and layer >= self.deep_layer_start:
            assert self.mass_thresh_deep is not None
            return self.mass_thresh_deep
        assert self.mass_thresh is not None
        return self.mass_thresh

    def validate_for_model(self, num_layers: int, max_positions: int | None = None) -> None:
        """Check the schedule against the model's layers and (when known) positions."""
        for name in ("recent_n", "min_keep"):
            v = getattr(self, name)
            if max_positions is not None and v > max_positions:
                raise RedKnotConfigError(
                    f"sparse_ffn {self.source}: {name}={v} exceeds the model's "
                    f"{max_positions} positions")
        if self.dense_until > num_layers:
            raise RedKnotConfigError(
                f"sparse_ffn {self.source}: dense_until={self.dense_until} exceeds the "
                f"model's {num_layers} layers")
        if self.deep_layer_start is not None and self.deep_layer_start > num_layers:
            raise RedKnotConfigError(
                f"sparse_ffn {self.source}: deep_layer_start={self.deep_layer_start} exceeds "
                f"the model's {num_layers} layers")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SparseFFNConfig:
        if not isinstance(data, dict):
            raise RedKnotConfigError(f"sparse_ffn {source}: expected a JSON object, got "
                                     f"{type(data).__name__}")
        unknown = sorted(k for k in data if k not in _SPARSE_KEYS
                         and k not in _SPARSE_INFO_KEYS and not k.startswith("_"))
        if unknown:
            raise RedKnotConfigError(f"sparse_ffn {source}: unknown key(s) {unknown}; "
                                     f"expected {list(_SPARSE_KEYS)}")
        if "mass_thresh" not in data and "keep_fraction" not in data:
            raise RedKnotConfigError(f"sparse_ffn {source}: missing required key 'mass_thresh' "
                                     "(or 'keep_fraction')")
        return cls(**{k: data[k] for k in _SPARSE_KEYS if k in data}, source=source)

    @classmethod
    def from_json(cls, path: str | Path) -> SparseFFNConfig:
        return cls.from_dict(_read_json(path, "sparse_ffn"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _SPARSE_KEYS if getattr(self, k) is not None}

    def content_hash(self) -> str:
        """sha256 over the fields that change behaviour (not the source)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


REUSE_POLICIES = ("selective", "seed")
RECOMPUTE_SELECT = ("deviation", "question", "pooled", "blend", "anchored")


@dataclass(frozen=True)
class ReuseConfig:
    """Offline KV reuse (:mod:`redknot_vllm.reuse`): where segments live, what is recomputed."""

    policy: str = "selective"
    """``selective``: reused tokens are not computed, except the first ``recompute_first``
    of each segment and the chunks whose stored KV deviated most from in-context KV when
    profiled (``redknot precompute``), up to ``recompute_fraction`` of the segment in all.
    ``seed``: every token is computed and the local heads read the relocated stored KV (the
    original's policy; no compute is saved, kept for comparison)."""
    recompute_first: int = 16
    recompute_fraction: float = 0.15
    """Share of each segment's tokens that is recomputed, its first ``recompute_first``
    included, rounded to whole chunks; a request can set its own
    (``kv_transfer_params={"redknot": {"recompute_fraction": f}}``)."""
    recompute_select: str = "question"
    """Which chunks fill the recompute share after the first tokens (``selective``):
    ``question`` (default), this request's context first: the chunks that share the most
    rare token pairs with the request's question (its tokens after the last segment), then
    by deviation; the set then depends on the request, so it is part of the prefix-cache
    salt. ``deviation``, the segment's own rule (its chunks whose KV moved most behind
    unrelated context when probed). On Qwen2.5-Coder-0.5B at 8K-32K (H200, n = 80 per
    cell, 15% recomputed) ``question`` kept 0.74 of dense accuracy on average and
    ``deviation`` 0.53 (``benchmarks/results/reuse-quality-qwen05-h200.json``).
    ``pooled`` (experimental, not measured on a GPU; behind ``question`` at 30% and 50% in a
    CPU diagnostic, ``docs/reuse.md``): the share is of the request's reused tokens
    together, spent on the segments the question points to first, each whole while the
    budget holds it, then by deviation (:func:`redknot_vllm.reuse.policy.pooled_plan`).
    ``blend`` (experimental, CacheBlend's rule; level with ``question`` in a CPU
    diagnostic, at more FLOPs, ``docs/reuse.md``): the first ``blend_layers`` layers run on
    every token, then each segment's chunks whose KV deviated most from the spliced KV
    there, in this request, run the remaining layers (:mod:`redknot_vllm.reuse.blend`).
    ``anchored`` (experimental): the segment the question shares most with and every
    segment after it are computed, those before it reused under ``question``
    (:func:`redknot_vllm.reuse.policy.anchored_plan`); what it saves depends on where the
    asked document sits."""
    store_context: str | tuple[int, ...] | None = None
    """What ``redknot precompute`` computes each document behind (a text, or token ids);
    the document's KV is stored moved back to ``[0, L)`` without it. None: each document
    is prefilled alone. A document stored alone starts at an empty context, so its KV is
    that of the *first* passage of a prompt, and in a prompt of many documents the stale
    later ones draw the answer; behind a context of the same kind as the prompts (their
    instructions and a few documents that are never asked about) it reads as one passage
    among many: on Qwen2.5-Coder-0.5B's 24-record QA at 8K-32K (H100, n = 100 per cell)
    behind 1,024 tokens of the task 0.97-0.98 of dense, stored alone 0.47-0.92
    (``docs/reuse.md``). Part of the segments' key: segments stored behind
    another context (or alone) are not this engine's. Must differ from precompute's probe
    text, which measures the deviation."""
    blend_layers: int = 2
    """``blend``: decoder layers run on every reused token before the choice (at least 2:
    layer 0's KV depends on the token and its position only, so it never deviates); their
    FLOPs are the price of choosing from the request's own KV."""
    chunk: int = 16
    """Tokens per recompute decision. (On H100 at 32K, chunks of 16 and 128, FA3's query
    tile, measured the same TTFT; ``benchmarks/results/reuse-h100.json`` is measured at 16.)"""
    min_tokens: int = 64
    """Shortest segment that is stored or matched."""
    auto: bool = True
    """Find stored segments in every prompt by content hash; else only ranges a request
    marks (``kv_transfer_params={"redknot": {"reuse": [[start, end], ...]}}``)."""
    store_marked: bool = False
    """Store a marked range that is not stored yet the first time a request marks it
    (opt-in). Its KV is the in-context KV of that request, moved back to ``[0, L)``; a
    ``redknot precompute`` of the same tokens replaces it with the KV prefilled alone."""
    store_dir: str | None = None
    """Disk tier (safetensors + index); the default is ``$VLLM_REDKNOT_CACHE_DIR/kv-segments``.
    Trusted like the weights only in what it names: segments are verified with a keyed
    checksum whose secret lives outside it (``VLLM_REDKNOT_SEGMENT_KEY``)."""
    gpu_bytes: int = 0
    host_bytes: int = 4 << 30
    disk_bytes: int = 64 << 30
    client_store: bool = False
    """Let requests write segments (``{"store": true}``, ``{"probe": ...}``): what
    ``redknot precompute`` does. Off by default, so API clients cannot fill the store or
    evict the operator's documents; an operator's own engine for ``precompute`` turns it
    on."""
    max_store_tokens: int = 32768
    """The most tokens one request may store (``store``, ``probe`` or ``store_marked``)."""
    max_marked_ranges: int = 64
    """The most ``[start, end)`` ranges one request may mark; more turns reuse off for it."""

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> RedKnotConfigError:
            return RedKnotConfigError(f"reuse.{name} is {getattr(self, name)!r}; expected {want}")

        if self.policy not in REUSE_POLICIES:
            raise bad("policy", f"one of {list(REUSE_POLICIES)}")
        if self.recompute_select not in RECOMPUTE_SELECT:
            raise bad("recompute_select", f"one of {list(RECOMPUTE_SELECT)}")
        for name in ("recompute_first", "max_store_tokens", "max_marked_ranges"):
            if not is_int(getattr(self, name)) or not 0 <= getattr(self, name) <= POSITION_LIMIT:
                raise bad(name, f"an integer in [0, {POSITION_LIMIT}]")
        for name in ("gpu_bytes", "host_bytes", "disk_bytes"):
            if not is_int(getattr(self, name)) or not 0 <= getattr(self, name) <= 1 << 62:
                raise bad(name, "a number of bytes in [0, 2**62]")
        if not is_number(self.recompute_fraction) or not 0 <= self.recompute_fraction <= 1:
            raise bad("recompute_fraction", "a number in [0, 1]")
        if not is_int(self.blend_layers) or not 2 <= self.blend_layers <= 1024:
            raise bad("blend_layers", "an integer in [2, 1024], below the model's layer count "
                      "(layer 0's KV never deviates, so the choice needs at least 2)")
        if not is_int(self.chunk) or not 1 <= self.chunk <= POSITION_LIMIT:
            raise bad("chunk", f"an integer in [1, {POSITION_LIMIT}]")
        if not is_int(self.min_tokens) or not 16 <= self.min_tokens <= POSITION_LIMIT:
            raise bad("min_tokens", "an integer >= 16 (segments are found by their first 16 "
                      "tokens)")
        for name in ("auto", "store_marked", "client_store"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.store_dir is not None and not isinstance(self.store_dir, str):
            raise bad("store_dir", "a folder path or null")
        ctx = self.store_context
        if isinstance(ctx, list):  # from JSON
            ctx = tuple(ctx)
            object.__setattr__(self, "store_context", ctx)
        if ctx is not None and not (
                (isinstance(ctx, str) and 0 < len(ctx) <= 1 << 20)
                or (isinstance(ctx, tuple) and 0 < len(ctx) <= POSITION_LIMIT
                    and all(is_int(t) and 0 <= t < 1 << 31 for t in ctx))):
            raise bad("store_context", "null, a non-empty text (at most 1 MiB) or a non-empty "
                      "list of token ids")

    def context_hash(self) -> str:
        """sha256 of ``store_context`` (the segments' key field), or "" when None."""
        if self.store_context is None:
            return ""
        value = (self.store_context if isinstance(self.store_context, str)
                 else list(self.store_context))
        return hashlib.sha256(json.dumps(value).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReuseConfig:
        if not isinstance(d, dict):
            raise RedKnotConfigError(f"reuse must be an object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise RedKnotConfigError(f"reuse: unknown option(s) {unknown}; expected {names}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(d["store_context"], tuple):
            d["store_context"] = list(d["store_context"])
        return d


@dataclass(frozen=True)
class RedKnotConfig:
    """Everything RedKnot needs in a worker, parsed from ``additional_config["redknot"]``."""

    head_config: HeadConfig | None
    """Head-class map; None runs the RedKnot model class dense (logged)."""
    sparse_ffn: SparseFFNConfig | None = None
    """Sparse-FFN schedule; None keeps the FFN dense."""
    require_gate: bool = False
    """Refuse to start unless ``redknot gate`` passed for this model, dtype and config."""
    reuse: ReuseConfig | None = None
    """Offline KV reuse; None: off (needs the RedKnot connector when on)."""
    segpaged: bool = False
    """SegPagedAttention (experimental; CPU and CUDA; not with a full tail or the seed
    reuse policy):
    each decoder layer's local heads become an attention layer of their own whose KV-cache
    group keeps only its sink and window pages, and they decode by head class too
    (``redknot_vllm.segpaged``)."""

    _KEYS = ("head_config", "sparse_ffn", "require_gate", "reuse", "segpaged")

    def __post_init__(self) -> None:
        if not self.segpaged:
            return
        if self.head_config is None:
            raise RedKnotConfigError("segpaged needs a head_config with local heads")
        # each refusal names what SegPaged does not carry yet, so the result is never wrong
        if self.reuse is not None and self.reuse.policy == "seed":
            raise RedKnotConfigError(
                "segpaged supports reuse with reuse.policy 'selective' only (the seed policy "
                "overwrites local heads inside a layer that SegPaged splits in two); set "
                "reuse.policy to 'selective' or drop segpaged")
        if self.head_config.tail_full_tokens:
            raise RedKnotConfigError(
                f"segpaged: head config {self.head_config.source} has tail_full_tokens="
                f"{self.head_config.tail_full_tokens}, but a prompt's last tokens cannot "
                "attend fully on local heads whose middle pages are freed; set "
                "tail_full_tokens to 0 or drop segpaged")

    @classmethod
    def from_additional_config(cls, additional: dict[str, Any] | None) -> RedKnotConfig | None:
        """Parse ``additional_config``; None when it has no ``"redknot"`` entry."""
        if not additional or REDKNOT_KEY not in additional:
            return None
        raw = additional[REDKNOT_KEY]
        if not isinstance(raw, dict):
            raise RedKnotConfigError(f'additional_config["{REDKNOT_KEY}"] must be an object, '
                                     f"got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(cls._KEYS))
        if unknown:
            raise RedKnotConfigError(f'additional_config["{REDKNOT_KEY}"]: unknown option(s) '
                                     f"{unknown}; expected {list(cls._KEYS)}")
        head = raw.get("head_config")
        sparse = raw.get("sparse_ffn")
        gate = raw.get("require_gate")
        for key, v in (("require_gate", gate), ("segpaged", raw.get("segpaged"))):
            if v is not None and not isinstance(v, bool):
                raise RedKnotConfigError(f'additional_config["{REDKNOT_KEY}"]["{key}"] must '
                                         f"be true or false, got {v!r}")
        hc = None if head is None else _load(head, HeadConfig, "head_config")
        return cls(
            head_config=hc,
            sparse_ffn=None if sparse is None else _load(sparse, SparseFFNConfig, "sparse_ffn"),
            require_gate=resolve_require_gate(hc, gate),
            reuse=None if raw.get("reuse") is None else ReuseConfig.from_dict(raw["reuse"]),
            segpaged=bool(raw.get("segpaged", False)),
        )

    def to_additional_config(self) -> dict[str, Any]:
        """Inline form for ``additional_config``: no file paths reach the workers."""
        def inline(c: HeadConfig | SparseFFNConfig | None) -> dict[str, Any] | None:
            return None if c is None else {**c.to_dict(), "_source": c.source}

        return {REDKNOT_KEY: {"head_config": inline(self.head_config),
                              "sparse_ffn": inline(self.sparse_ffn),
                              "require_gate": self.require_gate,
                              "reuse": None if self.reuse is None else self.reuse.to_dict(),
                              "segpaged": self.segpaged}}


def _load(value: Any, cls: Any, name: str) -> Any:
    if isinstance(value, (str, Path)):
        return cls.from_json(value)
    if isinstance(value, dict):
        return cls.from_dict(value, source=str(value.get("_source", f"<inline {name}>")))
    if isinstance(value, (HeadConfig, SparseFFNConfig)):
        return value
    raise RedKnotConfigError(f"{name} must be a JSON file path or an object, "
                             f"got {type(value).__name__}")


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path).expanduser()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RedKnotConfigError(f"cannot read {what} file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise RedKnotConfigError(f"{what} file {path} is not a JSON text file (undecodable "
                                 f"byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise RedKnotConfigError(f"{what} file {path} is not valid JSON (line {e.lineno}): "
                                 f"{e.msg}") from e


def is_int(v: Any) -> bool:
    """An int from JSON or Python, not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def model_architecture(model: str) -> str:
    """The ``architectures[0]`` of a local HF folder (no hub access)."""
    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        raise RedKnotConfigError(
            f"{model} has no config.json; pass a local HF model folder (RedKnot never "
            "downloads), or pass `architecture=` explicitly")
    archs = json.loads(cfg.read_text()).get("architectures") or []
    if not archs:
        raise RedKnotConfigError(f"{cfg} lists no architectures")
    return archs[0]


def _validate_against_local_model(cfg: RedKnotConfig, model: str, tp_size: int) -> None:
    """Fail in the caller's process, before any engine starts, when the model is local.

    The workers validate again against the HF config vLLM actually loads.
    """
    path = Path(model) / "config.json"
    if not path.is_file():
        return
    try:
        dims = ModelDims.from_hf_config(json.loads(path.read_text()))
    except ValueError:
        return  # not a decoder config we can read: the workers validate what vLLM loads
    if cfg.head_config is not None:
        cfg.head_config.validate_for_model(dims.num_layers, dims.num_kv_heads, tp_size,
                                           dims.max_positions)
    if cfg.sparse_ffn is not None:
        cfg.sparse_ffn.validate_for_model(dims.num_layers, dims.max_positions)


def redknot_architecture(arch: str) -> str:
    """The RedKnot override for a stock architecture, or a clear error."""
    if arch in redknot_names():
        return arch
    if arch not in ARCHITECTURES:
        raise RedKnotConfigError(
            f"architecture {arch} is not supported by RedKnot; supported: "
            f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch][0]


def resolve_require_gate(hc: HeadConfig | None, require_gate: bool | None) -> bool:
    """``require_gate`` as given, or by default: on for a shipped quality default
    (:mod:`redknot_vllm.defaults`), off for a user's own config. Turning it off for a
    shipped default, and running a user's config ungated, are logged."""
    from redknot_vllm.defaults import quality_default_name

    if hc is None:
        return bool(require_gate)
    shipped = quality_default_name(hc)
    if shipped is not None and require_gate is None:
        logger.info_once("RedKnot: head config %s is the shipped quality default %s; its "
                         "quality gate is required (require_gate=False opts out)",
                         hc.source, shipped)
        return True
    if shipped is not None and not require_gate:
        logger.warning_once("RedKnot: the shipped quality default %s runs without its "
                            "quality gate (require_gate=False)", shipped)
    elif shipped is None and not require_gate:
        logger.warning_once("RedKnot: head config %s is not a shipped quality default and no "
                            "quality gate is required for it; `redknot gate MODEL "
                            "--head-config FILE` measures it, and require_gate=True enforces "
                            "that result", hc.source)
    return bool(require_gate)


PD_KEY = "redknot_pd"
"""Key of ``kv_transfer_params`` and of ``kv_connector_extra_config``."""
ROLES = {"producer": "kv_producer", "consumer": "kv_consumer"}
TRANSPORTS = ("file", "cuda_ipc")
IPC_ONE_PROCESS = ("pd.transport 'cuda_ipc' needs tensor_parallel_size and "
                   "pipeline_parallel_size 1 (the engine core's own worker takes the KV); use "
                   "transport 'file' with more GPUs")


@dataclass(frozen=True)
class PDConfig:
    """``kv_connector_extra_config["redknot_pd"]``, parsed."""

    role: str
    """``producer`` (prefill engine) or ``consumer`` (decode engine)."""
    dir: Path
    """The shared folder transfers (or, with ``cuda_ipc``, their handles) are written to."""
    timeout_s: float = 10.0
    """How long the consumer waits for a transfer's file before computing the prompt."""
    transport: str = "file"
    """``file``: a safetensors file in ``dir`` (any two hosts sharing the folder);
    ``cuda_ipc``: the KV stays in the producer's GPU memory and ``dir`` holds a handle to it
    (engines on one host, one engine-core process each, tensor_parallel_size 1)."""
    hold_s: float = 60.0
    """``cuda_ipc``: how long the producer keeps a transfer no consumer acknowledged."""

    @classmethod
    def from_dict(cls, d: Any) -> PDConfig:
        keys = ("role", "dir", "timeout_s", "transport", "hold_s")
        if not isinstance(d, dict):
            raise RedKnotConfigError('pd must be a dict {"role": "producer"|"consumer", '
                                     '"dir": PATH, "timeout_s": SECONDS, "transport": '
                                     '"file"|"cuda_ipc", "hold_s": SECONDS}')
        unknown = set(d) - set(keys)
        if unknown:
            raise RedKnotConfigError(f"pd: unknown keys {sorted(unknown)}; the keys are "
                                     f"{', '.join(keys)}")
        role = d.get("role")
        if role not in ROLES:
            raise RedKnotConfigError(f"pd.role must be 'producer' or 'consumer', not {role!r}")
        if not isinstance(d.get("dir"), str | Path) or not str(d["dir"]):
            raise RedKnotConfigError("pd.dir must be the shared folder's path (a string)")
        secs = {}
        for k, default in (("timeout_s", 10.0), ("hold_s", 60.0)):
            t = d.get(k, default)
            if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 3600:
                raise RedKnotConfigError(f"pd.{k} must be a number of seconds in [0, 3600], "
                                         f"not {t!r}")
            secs[k] = float(t)
        transport = d.get("transport", "file")
        if transport not in TRANSPORTS:
            raise RedKnotConfigError(f"pd.transport must be 'file' or 'cuda_ipc', not "
                                     f"{transport!r}")
        folder = Path(d["dir"]).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RedKnotConfigError(f"pd.dir {folder} cannot be created ({e.strerror}); "
                                     "point it at a writable folder") from None
        return cls(role=role, dir=folder, transport=transport, **secs)

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "dir": str(self.dir), "timeout_s": self.timeout_s,
                "transport": self.transport, "hold_s": self.hold_s}


def engine_args(
    model: str,
    head_config: str | Path | dict[str, Any] | HeadConfig | None = None,
    sparse_ffn: str | Path | dict[str, Any] | SparseFFNConfig | None = None,
    *,
    request_stats: bool = True,
    require_gate: bool | None = None,
    reuse: ReuseConfig | dict[str, Any] | bool | None = None,
    architecture: str | None = None,
    segpaged: bool = False,
    pd: dict[str, Any] | None = None,
    **vllm_kwargs: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(**engine_args(...))`` with RedKnot switched on.

    Args:
        model: local HF model folder.
        head_config: head-class map (path, dict or :class:`HeadConfig`); None runs dense.
        sparse_ffn: sparse-FFN schedule (path, dict or :class:`SparseFFNConfig`); None keeps
            the FFN dense.
        request_stats: add the RedKnot connector for per-request FLOPs / kept-fraction
            accounting (``redknot_vllm.request_stats``). Without it RedKnot logs aggregates,
            and the worker extension still answers ``redknot_prefill_totals``.
        require_gate: refuse to start unless ``redknot gate`` passed for this model, dtype
            and configuration (checked in the worker, so ``vllm serve`` obeys it too).
            None (default): required for a shipped quality default, whose passed gate
            results ship with the package; not required for a user's own config (logged).
        reuse: offline KV reuse (:class:`ReuseConfig`, its dict, or True for the defaults);
            needs a head config and ``request_stats`` (the connector carries it).
        architecture: the model's stock architecture, if ``model`` has no local config.json.
        segpaged: SegPagedAttention (experimental; CPU and CUDA): local heads keep only
            their sink and window pages and decode by head class.
        pd: head-aware prefill/decode disaggregation (experimental, ``redknot_vllm.pd``):
            ``{"role": "producer" | "consumer", "dir": shared folder, "timeout_s": s}``;
            needs ``request_stats`` (the connector carries it), not with reuse.
        **vllm_kwargs: any other ``LLM`` / ``EngineArgs`` argument, passed through.

    Example:
        >>> from redknot_vllm import engine_args
        >>> args = engine_args("/models/smol", head_config={...})  # doctest: +SKIP
        >>> llm = LLM(**args, enforce_eager=True)  # doctest: +SKIP
    """
    hc = None if head_config is None else _load(head_config, HeadConfig, "head_config")
    cfg = RedKnotConfig(
        head_config=hc,
        sparse_ffn=None if sparse_ffn is None else _load(sparse_ffn, SparseFFNConfig,
                                                         "sparse_ffn"),
        require_gate=resolve_require_gate(hc, require_gate),
        reuse=(None if reuse is None or reuse is False else ReuseConfig() if reuse is True
               else reuse if isinstance(reuse, ReuseConfig) else ReuseConfig.from_dict(reuse)),
        segpaged=segpaged,
    )
    if cfg.reuse is not None and (cfg.head_config is None or not request_stats):
        raise RedKnotConfigError(
            "reuse needs head_config (an all-global one reuses KV under dense attention) and "
            "request_stats=True (the RedKnot connector plans and splices segments)")
    arch = redknot_architecture(architecture or model_architecture(model))
    _validate_against_local_model(cfg, model, int(vllm_kwargs.get("tensor_parallel_size", 1)))
    out = dict(vllm_kwargs)
    out["model"] = model
    hf = dict(out.get("hf_overrides") or {})
    if "architectures" in hf and hf["architectures"] != [arch]:
        raise RedKnotConfigError(f"hf_overrides already sets architectures={hf['architectures']}"
                                 f"; RedKnot needs [{arch!r}]")
    hf["architectures"] = [arch]
    out["hf_overrides"] = hf
    extra = dict(out.get("additional_config") or {})
    if REDKNOT_KEY in extra:
        raise RedKnotConfigError(f'additional_config["{REDKNOT_KEY}"] is set twice; pass '
                                 "head_config / sparse_ffn to engine_args instead")
    extra.update(cfg.to_additional_config())
    out["additional_config"] = extra
    if request_stats:
        if out.get("kv_transfer_config") is not None:
            raise RedKnotConfigError(
                "kv_transfer_config is already set; pass request_stats=False to keep yours "
                "(per-request RedKnot stats then need the RedKnot connector)")
        out["kv_transfer_config"] = connector_config()
    if pd is not None:
        if not request_stats or cfg.reuse is not None:
            raise RedKnotConfigError("pd needs request_stats=True (the RedKnot connector moves "
                                     "the KV) and no reuse (not combined yet); drop reuse")
        p = PDConfig.from_dict(pd)
        if p.transport == "cuda_ipc" and max(int(out.get("tensor_parallel_size") or 1),
                                             int(out.get("pipeline_parallel_size") or 1)) > 1:
            raise RedKnotConfigError(IPC_ONE_PROCESS)
        out["kv_transfer_config"] = {
            **out["kv_transfer_config"], "kv_role": ROLES[p.role],
            "kv_connector_extra_config": {PD_KEY: p.to_dict()},
            # a transfer that fails in the worker: vLLM recomputes the request's blocks
            "kv_load_failure_policy": "recompute"}
    if out.get("worker_extension_cls") in (None, ""):
        out["worker_extension_cls"] = WORKER_EXTENSION
    elif out["worker_extension_cls"] != WORKER_EXTENSION and request_stats:
        raise RedKnotConfigError(
            f"worker_extension_cls is already {out['worker_extension_cls']!r}; pass "
            "request_stats=False to keep it (request_stats() then needs "
            f"{WORKER_EXTENSION})")
    return out


def connector_config() -> dict[str, Any]:
    """``--kv-transfer-config`` for the RedKnot connector (only keys valid in v0.26 and
    v0.32)."""
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both"}
