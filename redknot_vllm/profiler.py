"""Head profiler: score every (layer, KV head) and classify it ``global`` or ``local``.

The HF model runs in fp32 on CPU with a probe attention function registered with
transformers' ``AttentionInterface``. The probe computes eager causal attention
probabilities ``P = softmax(Q K^T * scaling + causal mask)``, returns ``P @ V`` (the
model's normal attention output) and hands ``P`` of each layer to a recorder that folds it
into running per-query-head statistics, so no more than one layer's maps are alive at a
time. Three scores per (layer, query head), each reduced to KV heads by the max over the
query heads of its GQA group (a KV head must stay global if any of its query heads needs
the far context):

1. **prefix_shift** (the seed's): for a calibration text ``x`` and each of two unrelated
   prefixes ``p``, the maps of ``x`` alone (``A0``) are compared with the ``x`` block of the
   maps of ``p + x`` (``A1[:, P:, P:]``); the score is ``clamp(1 - cos(A0_h, A1x_h), 0, 1)``
   over the flattened ``L x L`` maps, averaged over texts and prefixes. ``x``, ``p1 + x`` and
   ``p2 + x`` run as one right-padded batch: causal attention never sees the padding, and
   both maps are in hand in the same layer call, so ``A0`` is never stored.
2. **edge_mass** (the seed's, per window ``W``): from ``A0``, the attention mass each query
   ``i`` puts outside what a local head keeps, ``{j < sink} ∪ {i - W < j <= i}``, averaged
   over the queries that have such keys at all (``i >= sink + W``; earlier ones would
   dilute it), then over the texts long enough to have any. A window no text reaches
   scores 0 (a local head that wide loses nothing on these texts) and is warned about.
3. **retrieval** (in the spirit of DuoAttention / Retrieval Heads): synthetic needle tasks.
   A needle "The secret code for the {name} archive is {5 digits}." sits at a random depth
   in the first 60% of filler prose, followed by the question and the teacher-forced
   answer. The score is the mean attention mass that the positions predicting the answer
   tokens put on the needle's number tokens, averaged over samples.

:func:`classify` normalises each score matrix by its max over all heads (edge_mass at the
chosen window), takes the (optionally weighted) max of the three, and makes the top
``round(L * H * global_fraction)`` heads global; the rest are local with that window and
sink. The scores travel in the JSON's ``profiling_meta`` so a sweep can re-classify with
:func:`load_scores` without profiling again.

Calibration texts are deterministic synthetic prose (seeded in a domain of their own, so
they never coincide with evaluation prompts) or user files: a folder of ``.txt`` files (one
text each), a ``.jsonl`` with a ``"text"`` field per line, or one ``.txt`` file, which is cut
into consecutive ``max_tokens`` chunks. Texts keep the tokenizer's default leading special
tokens and are truncated to ``max_tokens`` tokens.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from redknot_vllm.head_config import HeadConfig

logger = logging.getLogger(__name__)

METHOD = ("redknot-profiler-v1: max(prefix_shift, edge_mass@W, retrieval), "
          "each max-normalised")
PROBE_NAME = "redknot_probe"
DEFAULT_WINDOWS: tuple[int, ...] = (256, 512, 1024, 2048)
PREFIXES: tuple[str, ...] = (
    "The following document is provided for reference.\n\n",
    "Background context unrelated to the question below.\n\n",
)
SCORE_NAMES: tuple[str, ...] = ("prefix_shift", "edge_mass", "retrieval")
NEEDLE_MAX_DEPTH = 0.6
_DECIMALS = 6
_MIN_MAX_TOKENS = 64
_CLASSIFY_PARAMS = ("global_fraction", "window", "sink", "weights", "profiled_sink")

Matrix = list[list[float]]


class ProfileError(ValueError):
    """A profiling or classification argument that cannot work; the message names it."""


# --------------------------------------------------------------------------- scores
@dataclass
class ProfileScores:
    """Per-(layer, KV head) scores of one profiling run, each in [0, 1]."""

    num_layers: int
    num_kv_heads: int
    prefix_shift: Matrix
    """``[L][H]`` attention-map change when an unrelated prefix is prepended."""
    edge_mass: dict[int, Matrix]
    """Window -> ``[L][H]`` attention mass a local head with that window would drop."""
    retrieval: Matrix
    """``[L][H]`` attention mass on the needle while the answer is produced."""
    windows: tuple[int, ...]
    sink: int
    params: dict[str, Any] = field(default_factory=dict)
    """Profiling parameters (max_tokens, n_texts, n_retrieval, seed, calibration, ...)."""
    model_fingerprint: str = ""
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "prefix_shift": self.prefix_shift,
            "edge_mass": {str(w): m for w, m in sorted(self.edge_mass.items())},
            "retrieval": self.retrieval,
            "windows": list(self.windows),
            "sink": self.sink,
            "params": self.params,
            "model_fingerprint": self.model_fingerprint,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileScores:
        return cls(
            num_layers=int(d["num_layers"]),
            num_kv_heads=int(d["num_kv_heads"]),
            prefix_shift=d["prefix_shift"],
            edge_mass={int(w): m for w, m in d["edge_mass"].items()},
            retrieval=d["retrieval"],
            windows=tuple(int(w) for w in d["windows"]),
            sink=int(d["sink"]),
            params=dict(d.get("params", {})),
            model_fingerprint=d.get("model_fingerprint", ""),
            model=d.get("model", ""),
        )

    @classmethod
    def from_head_config_json(cls, path: str | Path) -> ProfileScores:
        """Read the scores back from a head config written by :func:`profile`."""
        hc = HeadConfig.from_json(path)
        meta = hc.info.get("profiling_meta")
        prov = hc.info.get("provenance")
        if not isinstance(meta, dict) or "scores" not in meta or not isinstance(prov, dict):
            raise ProfileError(f"{path} has no profiling_meta.scores / provenance; it was not "
                               "written by `redknot profile`, so there is nothing to re-classify")
        s = meta["scores"]
        params = {k: v for k, v in prov.get("parameters", {}).items()
                  if k not in _CLASSIFY_PARAMS}
        params["sink"] = int(meta["sink"])
        edge = {int(w): m for w, m in s["edge_mass"].items()}
        return cls(
            num_layers=hc.num_layers,
            num_kv_heads=hc.num_kv_heads,
            prefix_shift=s["prefix_shift"],
            edge_mass=edge,
            retrieval=s["retrieval"],
            windows=tuple(sorted(edge)),
            sink=int(meta["sink"]),
            params=params,
            model_fingerprint=prov.get("model_fingerprint", ""),
            model=prov.get("model", ""),
        )


def load_scores(path: str | Path) -> ProfileScores:
    """Scores stored in a profiled head config (see :meth:`ProfileScores.from_head_config_json`)."""
    return ProfileScores.from_head_config_json(path)


# ---------------------------------------------------------------------- probe attention
Handler = Callable[[int, torch.Tensor], None]


@dataclass
class _Probe:
    """What the probe hands attention maps to during one forward pass."""

    handler: Handler
    rows: torch.Tensor | None = None
    """Query positions whose maps the handler needs; None for the full ``[T, T]`` maps."""


_active: list[_Probe | None] = [None]
"""The recorder of the forward pass in flight (one slot: profiling is single-threaded)."""
_buffers: dict[str, torch.Tensor] = {}


def _buffer(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A scratch tensor reused across layers and passes.

    Maps are hundreds of MB; allocating them afresh per layer costs more in page faults
    (fresh mmap'd memory is zeroed by the kernel) than the arithmetic on them.
    """
    if _active[0] is None:  # not profiling: nothing would free the buffer later
        return torch.empty(shape)
    numel = math.prod(shape)
    buf = _buffers.get(name)
    if buf is None or buf.numel() < numel:
        buf = _buffers[name] = torch.empty(numel)
    return buf[:numel].view(shape)


def probe_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    dropout: float = 0.0, **kw: Any) -> tuple[torch.Tensor, None]:
    """Eager causal attention that shows its probabilities to the active recorder.

    ``query`` is ``[B, Hq, Tq, D]``, ``key``/``value`` ``[B, Hkv, Tk, D]``; returns the
    output as ``[B, Tq, Hq, D]`` like transformers' own attention functions. The recorder
    gets ``[B, Hq, Tq, Tk]`` maps, or ``[B, Hq, len(rows), Tk]`` when it asked for rows.
    """
    for unsupported in ("softcap", "s_aux"):
        if kw.get(unsupported) is not None:
            raise NotImplementedError(f"the head profiler does not support {unsupported}")
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = module.scaling if scaling is None else scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    # transformers builds no mask for attention functions it does not know, so the causal
    # (and any native sliding-window) mask is made here; queries are the last q_len keys.
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    k_pos = torch.arange(kv_len)[None]
    hidden = k_pos > q_pos
    if kw.get("sliding_window"):
        hidden |= k_pos <= q_pos - kw["sliding_window"]
    bias = torch.zeros(hidden.shape).masked_fill_(hidden, -math.inf)
    if attention_mask is not None:
        m = attention_mask[..., :kv_len]
        bias = bias.masked_fill(~m, -math.inf) if m.dtype == torch.bool else bias + m
    probe = _active[0]
    if probe is not None and probe.rows is not None:
        # only a few rows are recorded: fused attention for the output, maps for the rows
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=bias,
                                                               scale=scale)
        rows = probe.rows
        s = torch.matmul(query[:, :, rows], k.transpose(2, 3))
        probe.handler(module.layer_idx,
                      torch.softmax(torch.add(bias[..., rows, :], s, alpha=scale), dim=-1))
        return out.transpose(1, 2).contiguous(), None
    shape = (*query.shape[:3], kv_len)
    scores = torch.matmul(query, k.transpose(2, 3), out=_buffer("scores", shape))
    probs = torch.softmax(torch.add(bias, scores, alpha=scale, out=scores), dim=-1,
                          out=_buffer("probs", shape))
    if probe is not None:
        probe.handler(module.layer_idx, probs)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


def register_probe() -> str:
    """Register :func:`probe_attention` with transformers; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_NAME, probe_attention)
    return PROBE_NAME


def load_model(model_dir: str | Path, attn_implementation: str = PROBE_NAME) -> Any:
    """The HF causal LM in fp32 on CPU (eval mode) with the given attention function."""
    from transformers import AutoModelForCausalLM

    if attn_implementation == PROBE_NAME:
        register_probe()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return model.eval()


def _run(model: Any, ids: torch.Tensor, probe: _Probe) -> None:
    """One forward pass of the decoder stack (no LM head: logits are not needed)."""
    _active[0] = probe
    try:
        with torch.inference_mode():
            model.base_model(input_ids=ids, use_cache=False)
    finally:
        _active[0] = None


# ------------------------------------------------------------------- synthetic prose
_NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines",
          "Jonas", "Kofi", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa",
          "Stefan", "Tamsin", "Umar", "Vera", "Wendell", "Yara"]
_PLACES = ["Lisbon", "the northern valley", "Kyoto", "a coastal village", "Tallinn",
           "the old mill", "Marrakesh", "the river delta", "Oslo", "a mountain pass",
           "Valparaiso", "the university town", "Ljubljana", "the salt flats", "Hobart"]
_JOBS = ["carpenter", "archivist", "ferry pilot", "botanist", "clockmaker", "surveyor",
         "baker", "schoolteacher", "glassblower", "engineer", "beekeeper", "cartographer"]
_THINGS = ["lanterns", "maps", "barrels", "letters", "seedlings", "bicycles", "ledgers",
           "crates of pears", "telescopes", "wool blankets", "bells", "notebooks"]
_ADJS = ["quiet", "crowded", "windy", "ancient", "busy", "narrow", "sunlit", "misty",
         "forgotten", "famous"]
_MONTHS = ["January", "March", "April", "June", "August", "September", "October",
           "November"]
_TEMPLATES = [
    "{name} worked as a {job} in {place} for {num} years.",
    "Every {month}, {name} travelled to {place2} with {num} {thing}.",
    "The {adj} streets of {place} were full of {thing} that season.",
    "In {year}, {name} and {name2} opened a small workshop near {place}.",
    "{name2} once said that {place} was the most {adj} place they had ever seen.",
    "The council of {place} counted {num} {thing} in the spring survey.",
    "Nobody expected {name} to leave {place} before the end of {month}.",
    "A letter from {name2} arrived on the {day}th, asking about the {thing}.",
    "By evening the market in {place2} had sold all {num} {thing}.",
    "{name} kept a record of every visitor, and there were {num} of them in {year}.",
    "The road between {place} and {place2} was {adj} and took {small} days on foot.",
    "When the storm came, {name} moved the {thing} into the barn.",
    "{name2} trained as a {job2} and later taught {name} the trade.",
    "Old maps show that {place2} was once a {adj} trading post.",
    "It rained for {small} days, so the festival in {place} was postponed to {month}.",
    "The {job} from {place2} repaired {num} {thing} before winter.",
    "Later that year, {name} wrote that the {thing} had been a mistake.",
    "{name} paid {num} coins for a house overlooking {place}.",
    "Children in {place} still sing a song about {name2} and the {thing}.",
    "The museum in {place2} opened in {year} with a collection of {thing}.",
]
_RECALLS = [
    "As mentioned earlier, {fact}",
    "This recalls what happened before: {fact}",
    "{name} often remembered that {fact}",
    "It is worth repeating that {fact}",
]


def _prose_pieces(rng: random.Random) -> Iterator[str]:
    """Endless varied prose, one sentence per piece with its separator in front.

    Paragraphs follow one protagonist and place, and now and then restate an earlier
    fact, so the text has long-range references for attention to find.
    """
    facts: list[str] = []
    first = True
    while True:
        name, place = rng.choice(_NAMES), rng.choice(_PLACES)
        for s in range(rng.randint(4, 8)):
            slots = dict(
                name=name if rng.random() < 0.6 else rng.choice(_NAMES),
                name2=rng.choice(_NAMES), place=place if rng.random() < 0.6
                else rng.choice(_PLACES), place2=rng.choice(_PLACES),
                job=rng.choice(_JOBS), job2=rng.choice(_JOBS), thing=rng.choice(_THINGS),
                adj=rng.choice(_ADJS), month=rng.choice(_MONTHS), num=rng.randint(2, 480),
                small=rng.randint(2, 9), year=rng.randint(1850, 2020), day=rng.randint(4, 28))
            if facts and rng.random() < 0.15:
                fact = rng.choice(facts)
                text = rng.choice(_RECALLS).format(name=name,
                                                   fact=fact[0].lower() + fact[1:])
            else:
                text = rng.choice(_TEMPLATES).format(**slots)
                facts.append(text)
            yield text if first else ("\n\n" if s == 0 else " ") + text
            first = False


def synthetic_texts(n: int, seed: int = 0, min_chars: int = 12000) -> list[str]:
    """``n`` deterministic prose texts of at least ``min_chars`` characters each."""
    out = []
    for i in range(n):
        # a string seed domain of its own: never the same stream as evaluation prompts
        pieces = _prose_pieces(random.Random(f"redknot-profile-calibration/{seed}/{i}"))
        text = ""
        while len(text) < min_chars:
            text += next(pieces)
        out.append(text)
    return out


def load_texts(path: str | Path) -> list[str]:
    """Texts from a folder of ``.txt`` files, a ``.txt`` file or a ``.jsonl`` ("text")."""
    p = Path(path)
    fix = ("pass a folder of .txt files, a .txt file or a .jsonl file with a \"text\" field "
           "per line")
    if not p.exists():
        raise ProfileError(f"texts (--texts): {p} does not exist; {fix}")
    if p.is_dir():
        texts = [f.read_text(encoding="utf-8") for f in sorted(p.glob("*.txt"))]
    elif p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProfileError(f"texts (--texts): {p} line {n} is not JSON: {e.msg}") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ProfileError(f"texts (--texts): {p} line {n} has no string \"text\" "
                                   "field")
            texts.append(row["text"])
    else:
        texts = [p.read_text(encoding="utf-8")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ProfileError(f"texts (--texts): {p} holds no non-empty text; {fix}")
    return texts


# --------------------------------------------------------------------------- recorder
class _Scores:
    """Running sums per (layer, query head), float64."""

    def __init__(self, layers: int, heads: int, windows: Sequence[int]) -> None:
        z = lambda: torch.zeros(layers, heads, dtype=torch.float64)  # noqa: E731
        self.shift, self.n_shift = z(), 0
        self.edge = {w: z() for w in windows}
        self.n_edge = dict.fromkeys(windows, 0)
        self.retrieval, self.n_retrieval = z(), 0


def _block(probs: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
    """``probs[:, idx][:, :, idx]`` for ``[H, T, T]`` maps (a view when ``idx`` is a slice)."""
    if isinstance(idx, slice):
        return probs[:, idx, idx]
    return probs.index_select(1, idx).index_select(2, idx)


def _prefix_probe(acc: _Scores, n: int, blocks: list[torch.Tensor | slice],
                  windows: Sequence[int], sink: int) -> _Probe:
    """Batch row 0 is ``x`` (``n`` tokens); row ``k`` is ``p_k + x``, ``x`` at ``blocks[k-1]``."""

    def handle(layer: int, probs: torch.Tensor) -> None:
        a0 = probs[0, :, :n, :n]
        n0 = torch.linalg.vector_norm(a0, dim=(-2, -1))
        tmp = _buffer("tmp", tuple(a0.shape))
        for k, idx in enumerate(blocks, 1):
            a1 = _block(probs[k], idx)
            n1 = torch.linalg.vector_norm(a1, dim=(-2, -1))
            dot = torch.mul(a0, a1, out=tmp).sum((-2, -1))
            cos = dot / (n0 * n1).clamp_min(1e-30)
            acc.shift[layer] += (1 - cos.double()).clamp_(0, 1)
        csum = torch.cumsum(a0, -1, out=tmp)
        for w in windows:
            if n <= sink + w:
                continue
            rows = torch.arange(sink + w, n)
            # mass on keys sink <= j <= i - W: a prefix-sum difference per query
            out = csum[:, rows, rows - w]
            if sink:
                out = out - csum[:, rows, sink - 1]
            acc.edge[w][layer] += out.double().clamp_(0, 1).mean(-1)

    return _Probe(handle)


def _retrieval_probe(acc: _Scores, queries: torch.Tensor, needle: torch.Tensor) -> _Probe:
    """Maps of the answer-predicting rows only; score = their mean mass on the needle."""

    def handle(layer: int, probs: torch.Tensor) -> None:
        mass = probs[0].index_select(2, needle).sum(-1).mean(-1)
        acc.retrieval[layer] += mass.double().clamp_(0, 1)

    return _Probe(handle, rows=queries)


# ------------------------------------------------------------------------ tokenizing
class _Tok:
    """Tokenizer wrapper: content without special tokens, plus the default leading ones."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        probe = "hello"
        with_sp = tokenizer(probe).input_ids
        plain = tokenizer(probe, add_special_tokens=False).input_ids
        cut = next((i for i in range(len(with_sp) - len(plain) + 1)
                    if with_sp[i:i + len(plain)] == plain), 0)
        # trailing specials (EOS) are dropped: they would sit mid-sequence or be truncated
        self.lead: list[int] = list(with_sp[:cut])

    def __call__(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)


def _calibration_ids(tok: _Tok, texts: Sequence[str], max_tokens: int, n_texts: int,
                     chunk_single: bool) -> list[list[int]]:
    room = max_tokens - len(tok.lead)
    if chunk_single:
        ids = tok(texts[0])
        chunks = [ids[i:i + room] for i in range(0, len(ids), room)][:n_texts]
    else:
        chunks = [tok(t)[:room] for t in texts[:n_texts]]
    return [tok.lead + c for c in chunks if c]


@dataclass
class _NeedleSample:
    ids: list[int]
    needle: list[int]
    """Positions of the needle's number tokens."""
    queries: list[int]
    """Positions whose next-token prediction is an answer token."""


_ARCHIVES = ["Harbor", "Juniper", "Meridian", "Obsidian", "Pelican", "Quartz", "Sable",
             "Tundra", "Velvet", "Willow", "Zephyr", "Granite"]


def _needle_sample(tok: _Tok, rng: random.Random, max_tokens: int) -> _NeedleSample:
    name, number = rng.choice(_ARCHIVES), rng.randint(10000, 99999)
    head = tok(f" The secret code for the {name} archive is")
    num = tok(f" {number}")
    tail = tok(".")
    question = tok(f"\nQuestion: What is the secret code for the {name} archive?\n"
                   f"Answer: The secret code for the {name} archive is")
    answer = tok(f" {number}.")
    budget = max_tokens - len(tok.lead) - len(head) - len(num) - len(tail) - len(question) \
        - len(answer)
    if budget < 16:
        raise ProfileError(f"max_tokens (--max-tokens) is {max_tokens}, too short for a "
                           "needle task; use at least 128")
    hay: list[list[int]] = []
    used = 0
    for i, piece in enumerate(_prose_pieces(rng)):
        ids = tok(piece if i else piece.lstrip())
        if used + len(ids) > budget:
            break
        hay.append(ids)
        used += len(ids)
    # sentence boundaries within the first 60% of the haystack's tokens
    bounds, acc = [0], 0
    for ids in hay:
        acc += len(ids)
        if acc <= NEEDLE_MAX_DEPTH * used:
            bounds.append(len(bounds))
    cut = rng.choice(bounds)
    before = [t for s in hay[:cut] for t in s]
    after = [t for s in hay[cut:] for t in s]
    start = len(tok.lead) + len(before) + len(head)
    prompt = tok.lead + before + head + num + tail + after + question
    ids = prompt + answer
    return _NeedleSample(ids=ids, needle=list(range(start, start + len(num))),
                         queries=list(range(len(prompt) - 1, len(ids) - 1)))


# -------------------------------------------------------------------------- profiling
def _check_model_dir(model_dir: str | Path) -> Path:
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise ProfileError(f"model_dir (MODEL) {p} is not a folder with config.json; pass a "
                           "local Hugging Face model folder (or `smollm2` on the command line)")
    return p


def _check_windows(windows: Sequence[int], sink: int) -> tuple[int, ...]:
    ws = tuple(sorted(set(windows)))
    if not ws or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in ws):
        raise ProfileError(f"windows (--windows) is {list(windows)!r}; expected positive "
                           "integers such as 256,512,1024,2048")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ProfileError(f"sink (--sink) is {sink!r}; expected an integer >= 0")
    return ws


def _positive(v: Any, name: str, flag: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ProfileError(f"{name} ({flag}) is {v!r}; expected an integer >= {minimum}")
    return v


def _to_matrix(t: torch.Tensor) -> Matrix:
    return [[round(float(x), _DECIMALS) for x in row] for row in t.tolist()]


def profile_heads(
    model_dir: str | Path,
    texts: Sequence[str] | str | Path | None = None,
    *,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    sink: int = 4,
    max_tokens: int = 2048,
    n_texts: int = 8,
    n_retrieval: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> ProfileScores:
    """Score every (layer, KV head) of the model at ``model_dir`` (see the module docstring).

    ``texts``: calibration texts, a path (see :func:`load_texts`) or None for synthetic
    prose. Scores are rounded to 6 decimals so that re-classifying from the JSON gives the
    same heads as classifying from the returned object.
    """
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from redknot_vllm.fingerprint import model_fingerprint

    root = _check_model_dir(model_dir)
    ws = _check_windows(windows, sink)
    _positive(max_tokens, "max_tokens", "--max-tokens", _MIN_MAX_TOKENS)
    _positive(n_texts, "n_texts", "--n-texts")
    _positive(n_retrieval, "n_retrieval", "--n-retrieval", 0)
    chunk_single = False
    if texts is None:
        source = f"synthetic(seed={seed})"
        texts = synthetic_texts(n_texts, seed, min_chars=8 * max_tokens)
    elif isinstance(texts, (str, Path)):
        source = str(texts)
        chunk_single = Path(texts).is_file() and Path(texts).suffix != ".jsonl"
        texts = load_texts(texts)
    else:
        source = f"<{len(texts)} texts>"
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ProfileError("texts is empty; pass non-empty strings, a path or None for "
                               "the built-in synthetic prose")

    cfg = AutoConfig.from_pretrained(str(root))
    layers, hq = cfg.num_hidden_layers, cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    tok = _Tok(AutoTokenizer.from_pretrained(str(root)))
    calib = _calibration_ids(tok, texts, max_tokens, n_texts, chunk_single)
    prefixes = [tok(p) for p in PREFIXES]
    needles = [_needle_sample(tok, random.Random(f"redknot-profile-needle/{seed}/{i}"),
                              max_tokens) for i in range(n_retrieval)]
    model = load_model(root)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    acc = _Scores(layers, hq, ws)
    s = len(tok.lead)

    bar = tqdm(total=len(calib) + len(needles), desc="profiling heads", unit="pass",
               disable=not progress)
    try:
        for x in calib:
            n = len(x)
            rows = [x] + [x[:s] + p + x[s:] for p in prefixes]
            blocks: list[torch.Tensor | slice] = [
                slice(len(p), len(p) + n) if s == 0 else
                torch.cat([torch.arange(s), torch.arange(s + len(p), len(p) + n)])
                for p in prefixes]
            # right padding: causal attention never lets a real token see a pad
            width = max(map(len, rows))
            batch = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            _run(model, batch, _prefix_probe(acc, n, blocks, ws, sink))
            acc.n_shift += len(prefixes)
            for w in ws:
                acc.n_edge[w] += n > sink + w
            bar.update()
        for ns in needles:
            _run(model, torch.tensor([ns.ids]),
                 _retrieval_probe(acc, torch.tensor(ns.queries), torch.tensor(ns.needle)))
            acc.n_retrieval += 1
            bar.update()
    finally:
        bar.close()
        _buffers.clear()

    def kv(t: torch.Tensor, n: int) -> Matrix:
        # a KV head is as non-local as the most non-local query head that shares it
        mean = t / max(n, 1)
        return _to_matrix(mean.view(layers, hkv, hq // hkv).amax(-1))

    for w in ws:
        if not acc.n_edge[w]:
            logger.warning("edge_mass@%d: no calibration text is longer than sink + window "
                           "= %d tokens, so it scores 0 (a window that wide drops nothing on "
                           "these texts); profile with --max-tokens > %d to measure it",
                           w, sink + w, sink + w)
    params = {
        "windows": list(ws), "sink": sink, "max_tokens": max_tokens, "n_texts": len(calib),
        "n_retrieval": len(needles), "seed": seed, "calibration": source,
        "dtype": "float32", "prefixes": list(PREFIXES),
        "edge_mass_texts": {str(w): acc.n_edge[w] for w in ws},
    }
    return ProfileScores(
        num_layers=layers, num_kv_heads=hkv,
        prefix_shift=kv(acc.shift, acc.n_shift),
        edge_mass={w: kv(acc.edge[w], acc.n_edge[w]) for w in ws},
        retrieval=kv(acc.retrieval, acc.n_retrieval),
        windows=ws, sink=sink, params=params,
        model_fingerprint=model_fingerprint(root), model=root.resolve().name,
    )


# ----------------------------------------------------------------------- classifying
def _check_fraction(global_fraction: Any) -> float:
    if (isinstance(global_fraction, bool) or not isinstance(global_fraction, (int, float))
            or not 0.0 <= global_fraction <= 1.0):
        raise ProfileError(f"global_fraction (--global-fraction) is {global_fraction!r}; "
                           "expected a number in [0, 1] (e.g. 0.2 for 20% global heads)")
    return float(global_fraction)


def _check_window(window: Any, windows: Sequence[int]) -> int:
    if window not in windows or isinstance(window, bool):
        raise ProfileError(f"window (--window) is {window!r}, which was not profiled; pick "
                           f"one of the profiled windows {sorted(windows)} or profile again "
                           f"with --windows including it")
    return int(window)


def combined_scores(scores: ProfileScores, window: int,
                    weights: dict[str, float] | None = None) -> Matrix:
    """``[L][H]`` max of the (weighted) max-normalised scores, edge_mass at ``window``."""
    _check_window(window, scores.windows)
    w = dict.fromkeys(SCORE_NAMES, 1.0)
    unknown = sorted(set(weights or {}) - set(SCORE_NAMES))
    if unknown:
        raise ProfileError(f"weights has unknown key(s) {unknown}; expected {list(SCORE_NAMES)}")
    w.update(weights or {})
    mats = {"prefix_shift": scores.prefix_shift, "edge_mass": scores.edge_mass[window],
            "retrieval": scores.retrieval}
    norm = {}
    for name, m in mats.items():
        top = max(max(row) for row in m)
        norm[name] = [[x / top if top > 0 else 0.0 for x in row] for row in m]
    return [[max(w[k] * norm[k][li][h] for k in SCORE_NAMES)
             for h in range(scores.num_kv_heads)] for li in range(scores.num_layers)]


def ranked_heads(scores: ProfileScores, window: int,
                 weights: dict[str, float] | None = None) -> list[tuple[int, int, float]]:
    """(layer, head, combined) from most to least global; ties by (layer, head)."""
    return _rank(combined_scores(scores, window, weights))


def _rank(comb: Matrix) -> list[tuple[int, int, float]]:
    order = sorted(((li, h) for li in range(len(comb)) for h in range(len(comb[li]))),
                   key=lambda lh: (-comb[lh[0]][lh[1]], lh[0], lh[1]))
    return [(li, h, comb[li][h]) for li, h in order]


def classify(scores: ProfileScores, global_fraction: float, window: int,
             sink: int | None = None, weights: dict[str, float] | None = None) -> HeadConfig:
    """Top ``round(L * H * global_fraction)`` heads global, the rest local(``window``, ``sink``).

    ``sink`` defaults to the profiled sink (4 by default), the one edge_mass assumed.
    """
    f = _check_fraction(global_fraction)
    window = _check_window(window, scores.windows)
    sink = scores.sink if sink is None else sink
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ProfileError(f"sink (--sink) is {sink!r}; expected an integer >= 0")
    if sink != scores.sink:
        logger.warning("classifying with sink %d but edge_mass was profiled with sink %d",
                       sink, scores.sink)
    comb = combined_scores(scores, window, weights)
    ranked = _rank(comb)
    n_global = round(f * len(ranked))
    global_set = {(li, h) for li, h, _ in ranked[:n_global]}
    classes = [["global" if (li, h) in global_set else "local"
                for h in range(scores.num_kv_heads)] for li in range(scores.num_layers)]
    provenance = {
        "model": scores.model,
        "model_fingerprint": scores.model_fingerprint,
        "method": METHOD,
        "parameters": {
            "global_fraction": f, "window": window, "sink": sink, "weights": weights,
            **{k: v for k, v in scores.params.items() if k != "sink"},
            "profiled_sink": scores.sink,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "redknot_vllm": _version(),
    }
    meta = {
        "sink": scores.sink,
        "scores": {
            "prefix_shift": scores.prefix_shift,
            "edge_mass": {str(w): m for w, m in sorted(scores.edge_mass.items())},
            "retrieval": scores.retrieval,
            "combined": _to_matrix(torch.tensor(comb, dtype=torch.float64)),
        },
    }
    return HeadConfig.from_dict({
        "num_layers": scores.num_layers,
        "num_kv_heads": scores.num_kv_heads,
        "dense_prefix_layers": 0,
        "kv_head_classification": classes,
        "kv_head_max_distance": [[window if c == "local" else -1 for c in row]
                                 for row in classes],
        "kv_head_sink_size": [[sink] * scores.num_kv_heads for _ in range(scores.num_layers)],
        "provenance": provenance,
        "profiling_meta": meta,
    }, source="<profile>")


def _version() -> str:
    from redknot_vllm import __version__

    return __version__


def profile(model_dir: str | Path, out: str | Path, *, global_fraction: float = 0.2,
            window: int = 1024, sink: int = 4, weights: dict[str, float] | None = None,
            **kw: Any) -> HeadConfig:
    """Profile, classify and write the head config JSON to ``out``; returns it.

    ``kw`` goes to :func:`profile_heads` (texts, windows, max_tokens, n_texts, ...).
    """
    # fail before minutes of profiling, not after
    _check_fraction(global_fraction)
    _check_model_dir(model_dir)
    _check_window(window, _check_windows(kw.get("windows", DEFAULT_WINDOWS), sink))
    if weights:
        unknown = sorted(set(weights) - set(SCORE_NAMES))
        if unknown:
            raise ProfileError(f"weights has unknown key(s) {unknown}; expected "
                               f"{list(SCORE_NAMES)}")
    scores = profile_heads(model_dir, sink=sink, **kw)
    hc = classify(scores, global_fraction, window, sink=sink, weights=weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hc.save_json(out)
    return hc
