"""Long-context quality tasks and metrics: RedKnot against dense, through vLLM.

Tasks (RULER / RAG style, completion mode with a primed answer, generated deterministically
from ``(seed, task, tokens, index)``):

* ``niah_single``: one pass key in filler prose;
* ``niah_multikey``: several vault codes, the question asks for one of them;
* ``niah_multivalue``: one key with several values at different depths, all must come back;
* ``variable_tracking``: "the value of B is the same as the value of A" (one hop); the
  answer is primed with the hop and needs A's value from far back;
* ``multidoc_qa``: numbered documents with one fact each; the evidence sits in a random
  document, never only the first;
* ``aggregation``: purchases scattered through the context, one item five times as often as
  the other; name the most frequent;
* ``multidoc_qa_many``: like ``multidoc_qa`` with 24 documents (people and cities drawn
  from larger pools), the evidence never in the first;
* ``retrieval_distractors``: one access code and four distractors, two with the same name
  on another object ("the Amber locker" vs "the Amber vault") and two with the same
  object under another name.

Not in the default set :data:`TASKS` (the shipped results were measured on it), by name:

* ``code_lookup``: a repository-style context, source files one after another (a path
  header, then Python functions); six files define a ``<name>_limit()`` that returns a
  number, and the question asks what one of them returns. Its documents are code files
  (the reuse benchmark stores them as segments).

Every prompt is built as token ids with the model's tokenizer, so dense and RedKnot see the
same ids and a cell's prompts have a known length. Metrics per cell: accuracy with a Wilson
95% interval, the RedKnot/dense ratio, the agreement of RedKnot's answer with dense's, and
the first-token KL divergence (coarse-grained: over the tokens both engines list in their
top-``logprobs`` plus one bucket for the rest, a lower bound of the full-vocabulary KL).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redknot_vllm.errors import RedKnotError

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
         "multidoc_qa", "aggregation", "multidoc_qa_many", "retrieval_distractors")
EXTRA_TASKS = ("code_lookup",)
"""Tasks available by name, outside the default set."""
PROMPT_MARGIN = 40
"""Prompt tokens = nominal length - this, so the answer fits in ``max_model_len``."""
MAX_NEW_TOKENS = 16
TOP_LOGPROBS = 20

_FILLER = [
    "The morning was quiet and the streets were still wet from the night rain.",
    "A few people waited at the bus stop, reading newspapers or looking at their phones.",
    "The bakery on the corner opened its doors and the smell of fresh bread drifted out.",
    "In the park, an old man fed the pigeons while children ran along the gravel paths.",
    "The river moved slowly under the stone bridge, carrying leaves toward the sea.",
    "Clouds gathered over the hills in the afternoon, but the rain held off until evening.",
    "At the market, farmers arranged apples, carrots and cabbages on wooden tables.",
    "The library was busy with students preparing for their final examinations.",
    "A cat slept on the windowsill, warmed by a patch of pale winter sunlight.",
    "The train to the coast left on time, its carriages half empty on a weekday.",
    "Workers repaired the roof of the town hall, replacing cracked tiles one by one.",
    "The teacher wrote a list of rivers on the blackboard and asked the class to copy it.",
    "Evening lights came on along the harbor, reflecting in the dark water.",
    "The museum had a new exhibition about the history of clocks and calendars.",
    "A cyclist stopped to fix a flat tire near the entrance of the old cemetery.",
    "The smell of coffee filled the small kitchen as the kettle began to whistle.",
    "Snow had fallen in the mountains, and the ski lifts would open next week.",
    "The choir practiced in the church hall every Thursday after dinner.",
    "A delivery van blocked the narrow lane for a few minutes before moving on.",
    "The garden needed weeding, and the tomatoes were finally turning red.",
    "Two friends argued cheerfully about which football team would win the league.",
    "The lighthouse keeper climbed the spiral stairs to check the great lamp.",
    "Rain tapped against the glass roof of the greenhouse all afternoon.",
    "The shop assistant folded sweaters and stacked them neatly by color.",
    "An airplane passed high overhead, leaving a thin white trail across the sky.",
    "The village festival featured music, dancing and a contest for the largest pumpkin.",
    "The doctor's waiting room was warm, and a radio played softly in the corner.",
    "Fishermen mended their nets on the pier while gulls circled above them.",
    "The old clock in the square chimed the hour, a little later than it should.",
    "A new café opened near the station, with tables set out on the pavement.",
]
FILLER_SENTENCES: tuple[str, ...] = tuple(_FILLER)
"""Neutral prose sentences the tasks pad with (also used by the reuse benchmark)."""

_NAMES = ["Amber", "Cobalt", "Crimson", "Ivory", "Jade", "Onyx", "Saffron", "Teal",
          "Violet", "Scarlet", "Indigo", "Silver", "Copper", "Olive", "Coral", "Azure"]
_PEOPLE = ["Anna Keller", "Boris Novak", "Clara Jensen", "David Moreau", "Elena Rossi",
           "Felix Wagner", "Greta Lund", "Hugo Bernard", "Irene Costa", "Jonas Berg",
           "Karin Vogel", "Leo Marchetti", "Maria Duval", "Nils Ekberg", "Olga Petrova",
           "Paul Lambert", "Rosa Almeida", "Simon Fischer", "Tara Quinn", "Victor Hale"]
_CITIES = ["Lisbon", "Oslo", "Vienna", "Prague", "Dublin", "Madrid", "Warsaw", "Athens",
           "Helsinki", "Budapest", "Brussels", "Zurich", "Naples", "Krakow", "Lyon", "Porto"]
_JOBS = ["a carpenter", "a nurse", "an engineer", "a painter", "a baker", "a pilot",
         "a librarian", "a chemist", "a gardener", "a journalist"]
_ITEMS = ["lamp", "chair", "kettle", "blanket", "mirror", "basket", "candle", "ladder",
          "bucket", "pillow", "shovel", "teapot"]
_FIRST = ["Ada", "Bjorn", "Carmen", "Dario", "Edith", "Fabio", "Gisela", "Henrik", "Ilse",
          "Joaquin", "Katja", "Lorenzo", "Mirela", "Niko", "Ottilie", "Pavel", "Renata",
          "Sergio", "Tilda", "Ulrich", "Vesna", "Wim", "Xenia", "Yusuf", "Zora"]
_LAST = ["Abbott", "Brandt", "Castillo", "Dufour", "Eriksen", "Falk", "Gallo", "Horvat",
         "Iversen", "Janssen", "Kowalski", "Lindqvist", "Moretti", "Nowak", "Olsen", "Pereira",
         "Quist", "Ramos", "Sorensen", "Tanaka", "Urban", "Varga", "Weber", "Zeller"]
_MORE_CITIES = _CITIES + ["Antwerp", "Bergen", "Coimbra", "Dresden", "Gdansk", "Graz",
                          "Malmo", "Seville", "Tampere", "Turin", "Utrecht", "Vilnius", "Riga",
                          "Bilbao"]
_OBJECTS = ["vault", "locker", "safe", "cabinet", "archive"]
# code filler: small generic functions (none returns a bare number), so that a context of
# source files reads like a repository
_CODE = [
    "def normalize(values):\n    total = sum(values)\n    return [v / total for v in values]\n",
    "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()\n",
    "class Cache:\n    def __init__(self):\n        self.items = {}\n\n"
    "    def get(self, key, default=None):\n        return self.items.get(key, default)\n",
    "def merge(a, b):\n    out = dict(a)\n    out.update(b)\n    return out\n",
    "def chunks(seq, size):\n    for i in range(0, len(seq), size):\n"
    "        yield seq[i:i + size]\n",
    "def is_valid(name):\n    return bool(name) and name.isidentifier()\n",
    "def flatten(rows):\n    return [x for row in rows for x in row]\n",
    "def parse_flag(text):\n    return text.strip().lower() in ('1', 'true', 'yes')\n",
    "class Timer:\n    def __enter__(self):\n        self.start = time.monotonic()\n"
    "        return self\n\n    def __exit__(self, *exc):\n"
    "        self.elapsed = time.monotonic() - self.start\n",
    "def unique(items):\n    seen = set()\n    return [x for x in items if not "
    "(x in seen or seen.add(x))]\n",
    "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n",
    "def join_path(*parts):\n    return '/'.join(p.strip('/') for p in parts if p)\n",
]
_MODULES = ["config", "storage", "network", "scheduler", "parser", "metrics", "auth",
            "cache", "worker", "export", "render", "index"]
_PACKAGES = ["core", "service", "utils", "client", "server", "tools"]
_VARS = ["QKZ", "MPL", "RTX", "BNV", "HJW", "YDF", "LQE", "ZSA", "WUC", "PGO", "KVM", "TFR"]


class QualityError(RedKnotError, ValueError):
    """A bad task, length or argument for the quality harness."""


@dataclass(frozen=True)
class Case:
    """One prompt with its expected answer(s)."""

    task: str
    tokens: int
    index: int
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...]
    """All of these must appear in the generated text for the case to count as correct."""
    question_tokens: int = 0
    """The prompt's last tokens that are the question (the rest is context)."""
    doc_starts: tuple[int, ...] = ()
    """Tasks made of documents (records, source files): where each document after the first
    begins in ``prompt_ids`` (its inserted fact, then the filler up to the next one), so
    reuse can store whole documents as segments; empty for the other tasks."""

    @property
    def context_ids(self) -> tuple[int, ...]:
        """The prompt without its question: what a RAG system would retrieve and reuse."""
        return self.prompt_ids[:len(self.prompt_ids) - self.question_tokens]


def _rng(seed: int, task: str, tokens: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{task}|{tokens}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _num(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


class _Builder:
    """Fills filler prose around inserted sentences up to an exact token budget."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._filler_ids = [self._ids(" " + s) for s in _FILLER]
        self._code_ids = [self._ids("\n" + s) for s in _CODE]
        self.question_tokens = 0
        """Length of the question of the last prompt built."""
        self.insert_starts: tuple[int, ...] = ()
        """Where each insert of the last prompt built begins, in prompt order."""

    def _ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def build(self, rng: random.Random, budget: int, inserts: Sequence[tuple[float, str]],
              question: str, header: str = "", code: bool = False) -> tuple[int, ...]:
        """``header`` + filler with ``inserts`` at relative depths + ``question``.

        Each insert is (depth in [0, 1], sentence); the filler is cut so that the prompt
        has at most ``budget`` tokens (and at least ``budget - 40``). ``code``: the filler
        is source code (functions separated by blank lines) and inserts go in as written.
        """
        head = self._ids(header) if header else []
        tail = self._ids(question)
        sep = "\n" if code else " "
        ins = [(d, self._ids(sep + s)) for d, s in inserts]
        room = budget - len(head) - len(tail) - sum(len(i) for _, i in ins)
        if room < 0:
            raise QualityError(f"tokens={budget} is too short for this task's facts and "
                               "question; use a longer length")
        filler: list[list[int]] = []
        used = 0
        pool = self._code_ids if code else self._filler_ids
        while True:
            s = pool[rng.randrange(len(pool))]
            if used + len(s) > room:
                break
            filler.append(s)
            used += len(s)
        slots = sorted((min(len(filler), round(d * len(filler))), k)
                       for k, (d, _) in enumerate(ins))
        body: list[int] = list(head)
        starts = []
        j = 0
        for pos, k in slots:
            while j < pos:
                body += filler[j]
                j += 1
            starts.append(len(body))
            body += ins[k][1]
        while j < len(filler):
            body += filler[j]
            j += 1
        self.question_tokens = len(tail)
        self.insert_starts = tuple(starts)
        return tuple(body + tail)


def _niah_single(b: _Builder, rng: random.Random, n: int) -> tuple[tuple[int, ...], tuple]:
    key = _num(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    ids = b.build(rng, n, [(rng.uniform(0.05, 0.9), needle)],
                  "\nWhat is the pass key? The pass key is")
    return ids, (key,)


def _niah_multikey(b: _Builder, rng: random.Random, n: int) -> tuple[tuple[int, ...], tuple]:
    names = rng.sample(_NAMES, 3)
    codes = [_num(rng) for _ in names]
    inserts = [(rng.uniform(0.05, 0.9), f"The access code for the {v} vault is {c}.")
               for v, c in zip(names, codes, strict=True)]
    t = rng.randrange(len(names))
    q = (f"\nQuestion: What is the access code for the {names[t]} vault?\n"
         f"Answer: The access code for the {names[t]} vault is")
    return b.build(rng, n, inserts, q), (codes[t],)


def _niah_multivalue(b: _Builder, rng: random.Random, n: int) -> tuple[tuple[int, ...], tuple]:
    name = rng.choice(_NAMES)
    values = [_num(rng) for _ in range(2)]
    depths = sorted(rng.uniform(0.05, 0.9) for _ in values)
    inserts = [(d, f"One of the special magic numbers for {name} is {v}.")
               for d, v in zip(depths, values, strict=True)]
    q = (f"\nQuestion: What are the two special magic numbers for {name}?\n"
         f"Answer: The two special magic numbers for {name} are")
    return b.build(rng, n, inserts, q), tuple(values)


def _variable_tracking(b: _Builder, rng: random.Random, n: int) -> tuple[tuple[int, ...], tuple]:
    a, c = rng.sample(_VARS, 2)
    value = _num(rng)
    # one hop: four hops are out of SmolLM2's reach even dense, and a distractor chain
    # kept dense at ~33% at 2K
    d1, d2 = sorted(rng.uniform(0.05, 0.9) for _ in range(2))
    inserts = [(d1, f"The value of {a} is {value}."),
               (d2, f"The value of {c} is the same as the value of {a}.")]
    # the hop is primed (unprimed, dense scored <= 25% at 2K); a's value is still far back
    q = (f"\nQuestion: What is the value of {c}?\n"
         f"Answer: {c} has the same value as {a}, which is")
    return b.build(rng, n, inserts, q), (value,)


def _multidoc_qa(b: _Builder, rng: random.Random, n: int) -> tuple[tuple[int, ...], tuple]:
    k = 6
    return _documents_qa(b, rng, n, rng.sample(_PEOPLE, k), rng.sample(_CITIES, k))


def _multidoc_qa_many(b: _Builder, rng: random.Random, n: int
                      ) -> tuple[tuple[int, ...], tuple]:
    k = 24
    people = [f"{f} {la}" for f, la in zip(rng.sample(_FIRST, k), rng.sample(_LAST, k),
                                            strict=True)]
    return _documents_qa(b, rng, n, people, rng.sample(_MORE_CITIES, k))


def _documents_qa(b: _Builder, rng: random.Random, n: int, people: list[str],
                  cities: list[str]) -> tuple[tuple[int, ...], tuple]:
    """One document per person (job, birthplace); the question asks about one of them."""
    k = len(people)
    jobs = [rng.choice(_JOBS) for _ in range(k)]
    evidence = rng.randrange(1, k)  # never only the first document
    inserts = [((i + 0.5) / k, f"Document {i + 1}: {p} is {j} who was born in {c}.")
               for i, (p, c, j) in enumerate(zip(people, cities, jobs, strict=True))]
    p = people[evidence]
    q = f"\nQuestion: In which city was {p} born?\nAnswer: {p} was born in"
    return b.build(rng, n, inserts, q), (cities[evidence],)


def _retrieval_distractors(b: _Builder, rng: random.Random, n: int
                           ) -> tuple[tuple[int, ...], tuple]:
    name, other = rng.sample(_NAMES, 2)
    obj, obj2, obj3 = rng.sample(_OBJECTS, 3)
    facts = [(name, obj), (name, obj2), (name, obj3), (other, obj), (rng.choice(
        [x for x in _NAMES if x not in (name, other)]), obj)]
    codes = rng.sample(range(10000, 100000), len(facts))
    inserts = [(rng.uniform(0.05, 0.9), f"The access code for the {nm} {ob} is {c}.")
               for (nm, ob), c in zip(facts, codes, strict=True)]
    q = (f"\nQuestion: What is the access code for the {name} {obj}?\n"
         f"Answer: The access code for the {name} {obj} is")
    return b.build(rng, n, inserts, q), (str(codes[0]),)


def _aggregation(b: _Builder, rng: random.Random, n: int) -> tuple[tuple[int, ...], tuple]:
    items = rng.sample(_ITEMS, 2)
    top = items[0]
    counts = [10, 2]
    events = [it for it, c in zip(items, counts, strict=True) for _ in range(c)]
    rng.shuffle(events)
    inserts = [(rng.uniform(0.05, 0.95), f"Somebody bought a {it} at the shop.")
               for it in events]
    q = ("\nQuestion: Which item did people buy most often at the shop?\n"
         "Answer: The item bought most often was a")
    return b.build(rng, n, inserts, q), (top,)


def _code_lookup(b: _Builder, rng: random.Random, n: int) -> tuple[tuple[int, ...], tuple]:
    """Six source files, each defining one ``<name>_limit()`` returning a number, among
    generic functions; the question asks one of them (its name and its file)."""
    k = 6
    names = rng.sample(_MODULES, k)
    pkgs = [rng.choice(_PACKAGES) for _ in names]
    values = rng.sample(range(1000, 10000), k)
    inserts = []
    for i, (nm, pk, v) in enumerate(zip(names, pkgs, values, strict=True)):
        d = (i + 0.5) / k
        inserts.append((d, f"\n# file: src/{pk}/{nm}.py\nimport time\n\n\n"
                           f"def {nm}_limit():\n    return {v}\n"))
    t = rng.randrange(1, k)  # never only the first file
    q = (f"\n\n# Question: what does {names[t]}_limit() in src/{pkgs[t]}/{names[t]}.py "
         f"return?\n# Answer: {names[t]}_limit() returns")
    return b.build(rng, n, inserts, q, code=True), (str(values[t]),)


DOCUMENT_TASKS = frozenset({"multidoc_qa", "multidoc_qa_many", "code_lookup"})
"""Tasks whose inserts are documents (one record or source file each, the filler after it
belonging to it): their cases carry ``doc_starts``."""

_GENERATORS: dict[str, Callable[[_Builder, random.Random, int], tuple[tuple[int, ...], tuple]]] = {
    "niah_single": _niah_single, "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue, "variable_tracking": _variable_tracking,
    "multidoc_qa": _multidoc_qa, "aggregation": _aggregation,
    "multidoc_qa_many": _multidoc_qa_many, "retrieval_distractors": _retrieval_distractors,
    "code_lookup": _code_lookup,
}


def make_cases(tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int], n: int,
               seed: int) -> list[Case]:
    """``n`` cases per (task, length); prompt tokens = length - :data:`PROMPT_MARGIN`."""
    unknown = [t for t in tasks if t not in _GENERATORS]
    if unknown:
        raise QualityError(f"tasks: unknown {unknown}; choose from "
                           f"{list(TASKS + EXTRA_TASKS)}")
    if n < 1:
        raise QualityError(f"n must be >= 1, got {n}")
    b = _Builder(tokenizer)
    out = []
    for task in tasks:
        for tokens in lengths:
            if tokens < 256:
                raise QualityError(f"lengths: {tokens} is below 256 tokens")
            for i in range(n):
                ids, ans = _GENERATORS[task](b, _rng(seed, task, tokens, i), tokens
                                             - PROMPT_MARGIN)
                docs = b.insert_starts[1:] if task in DOCUMENT_TASKS else ()
                out.append(Case(task, tokens, i, ids, ans, b.question_tokens, docs))
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def is_correct(text: str, answers: Sequence[str]) -> bool:
    t = _norm(text)
    return all(_norm(a) in t for a in answers)


def answer_span(text: str) -> str:
    """The answer part of a completion: up to the first newline or sentence end."""
    first = text.strip().split("\n", 1)[0]
    return _norm(re.split(r"(?<=[^0-9])\.\s|\.$", first, maxsplit=1)[0])


@dataclass
class Outcome:
    """What one engine produced for one case."""

    task: str
    tokens: int
    index: int
    text: str
    correct: bool
    first_logprobs: dict[int, float] = field(default_factory=dict)
    flops_saved: float | None = None
    ffn_kept_fraction: float | None = None


def run_cases(llm: Any, cases: Sequence[Case], *, redknot: bool,
              max_tokens: int = MAX_NEW_TOKENS, use_tqdm: bool = True,
              extra_args: dict[str, Any] | None = None) -> list[Outcome]:
    """Greedy completions of every case in one batched ``generate`` call (``extra_args``:
    the requests' ``SamplingParams.extra_args``, e.g. RedKnot's ``kv_transfer_params``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=TOP_LOGPROBS,
                        extra_args=extra_args)
    prompts = [TokensPrompt(prompt_token_ids=list(c.prompt_ids)) for c in cases]
    outs = llm.generate(prompts, sp, use_tqdm=use_tqdm)
    stats: dict[str, dict[str, Any]] = {}
    if redknot:
        from redknot_vllm import request_stats

        stats = request_stats(llm, [o.request_id for o in outs])
    result = []
    for c, o in zip(cases, outs, strict=True):
        comp = o.outputs[0]
        first = {int(t): float(lp.logprob) for t, lp in (comp.logprobs or [{}])[0].items()}
        st = stats.get(o.request_id, {})
        result.append(Outcome(c.task, c.tokens, c.index, comp.text,
                              is_correct(comp.text, c.answers), first,
                              st.get("flops_saved"), st.get("ffn_kept_fraction")))
    return result


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def coarse_kl(p_lp: dict[int, float], q_lp: dict[int, float]) -> float:
    """KL(p || q) over the tokens both top-k lists share, plus one bucket for the rest."""
    shared = sorted(set(p_lp) & set(q_lp))
    ps = [math.exp(p_lp[t]) for t in shared]
    qs = [math.exp(q_lp[t]) for t in shared]
    p_rest, q_rest = max(0.0, 1 - sum(ps)), max(0.0, 1 - sum(qs))
    kl = sum(p * (math.log(p) - math.log(max(q, 1e-30))) for p, q in zip(ps, qs, strict=True)
             if p > 0)
    if p_rest > 1e-12:
        kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, 1e-30)))
    return max(0.0, kl)


@dataclass
class Cell:
    """One (task, length) comparison."""

    task: str
    tokens: int
    n: int
    dense_acc: float
    redknot_acc: float
    ratio: float | None
    dense_ci95: tuple[float, float]
    redknot_ci95: tuple[float, float]
    agreement: float
    first_token_kl: float
    flops_saved: float | None
    ffn_kept_fraction: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """McNemar's exact two-sided p for paired outcomes: how likely a split of the
    discordant cases at least this uneven is when both engines are equally accurate."""
    if len(a) != len(b):
        raise QualityError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(dense: Sequence[Outcome], redknot: Sequence[Outcome]) -> list[Cell]:
    """Per-cell metrics; ``dense`` and ``redknot`` are outcomes of the same cases."""
    if [(o.task, o.tokens, o.index) for o in dense] != [
            (o.task, o.tokens, o.index) for o in redknot]:
        raise QualityError("dense and RedKnot outcomes are not for the same cases")
    groups: dict[tuple[str, int], list[tuple[Outcome, Outcome]]] = {}
    for d, r in zip(dense, redknot, strict=True):
        groups.setdefault((d.task, d.tokens), []).append((d, r))
    cells = []
    for (task, tokens), pairs in groups.items():
        n = len(pairs)
        kd = sum(d.correct for d, _ in pairs)
        kr = sum(r.correct for _, r in pairs)
        cells.append(Cell(
            task=task, tokens=tokens, n=n, dense_acc=kd / n, redknot_acc=kr / n,
            ratio=(kr / kd) if kd else None, dense_ci95=wilson(kd, n),
            redknot_ci95=wilson(kr, n),
            agreement=sum(answer_span(d.text) == answer_span(r.text) for d, r in pairs) / n,
            first_token_kl=sum(coarse_kl(d.first_logprobs, r.first_logprobs)
                               for d, r in pairs) / n,
            flops_saved=_mean([r.flops_saved for _, r in pairs]),
            ffn_kept_fraction=_mean([r.ffn_kept_fraction for _, r in pairs])))
    return cells


def fmt(x: float | None) -> str:
    """A ratio for people: three decimals, or n/a (no counted cell)."""
    return "n/a" if x is None else f"{x:.3f}"


@dataclass(frozen=True)
class Bar:
    """The quality bar: average and per-cell RedKnot/dense accuracy ratios, over the cells
    where dense scores at least ``min_dense_acc`` (a cell dense cannot do measures
    nothing)."""

    avg_ratio: float = 0.98
    min_cell_ratio: float = 0.95
    min_dense_acc: float = 0.5


def summarize(cells: Sequence[Cell], bar: Bar = Bar()) -> dict[str, Any]:
    """``avg_ratio``, ``min_ratio``, FLOPs saved per length, and whether ``bar`` is met.

    Only cells where dense reached ``bar.min_dense_acc`` count; the others are listed in
    ``not_counted`` (they measure nothing).
    """
    counted = [c for c in cells if c.ratio is not None and c.dense_acc >= bar.min_dense_acc]
    ratios = [c.ratio for c in counted]
    by_len: dict[int, list[float]] = {}
    for c in cells:
        if c.flops_saved is not None:
            by_len.setdefault(c.tokens, []).append(c.flops_saved)
    avg = sum(ratios) / len(ratios) if ratios else None
    low = min(ratios) if ratios else None
    return {
        "avg_ratio": avg, "min_ratio": low,
        "flops_saved": {str(k): sum(v) / len(v) for k, v in sorted(by_len.items())},
        "meets_bar": bool(avg is not None and low is not None and avg >= bar.avg_ratio
                          and low >= bar.min_cell_ratio),
        "counted_cells": len(counted),
        "not_counted": [f"{c.task}@{c.tokens}" for c in cells if c not in counted],
        "bar": asdict(bar),
    }
