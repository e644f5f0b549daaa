"""Token-level profiling inputs: the tokenizer wrapper, calibration ids and needle tasks.

A needle "The secret code for the {name} archive is {5 digits}." sits at a random depth in
the first :data:`NEEDLE_MAX_DEPTH` of filler prose, followed by the question and the
teacher-forced answer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redknot_vllm.profiler.prose import prose_pieces
from redknot_vllm.profiler.scores import ProfileError

NEEDLE_MAX_DEPTH = 0.6

class Tokens:
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


def calibration_ids(tok: Tokens, texts: Sequence[str], max_tokens: int, n_texts: int,
                     chunk_single: bool) -> list[list[int]]:
    room = max_tokens - len(tok.lead)
    if chunk_single:
        ids = tok(texts[0])
        chunks = [ids[i:i + room] for i in range(0, len(ids), room)][:n_texts]
    else:
        chunks = [tok(t)[:room] for t in texts[:n_texts]]
    return [tok.lead + c for c in chunks if c]


@dataclass
class NeedleSample:
    ids: list[int]
    needle: list[int]
    """Positions of the needle's number tokens."""
    queries: list[int]
    """Positions whose next-token prediction is an answer token."""


_ARCHIVES = ["Harbor", "Juniper", "Meridian", "Obsidian", "Pelican", "Quartz", "Sable",
             "Tundra", "Velvet", "Willow", "Zephyr", "Granite"]


def needle_sample(tok: Tokens, rng: random.Random, max_tokens: int,
                  distractors: int = 0) -> NeedleSample:
    """A needle task of at most ``max_tokens`` tokens; with ``distractors``, that many other
    archives' codes sit anywhere in the haystack (a retrieval head must find the right one)."""
    name, number = rng.choice(_ARCHIVES), rng.randint(10000, 99999)
    head = tok(f" The secret code for the {name} archive is")
    num = tok(f" {number}")
    tail = tok(".")
    question = tok(f"\nQuestion: What is the secret code for the {name} archive?\n"
                   f"Answer: The secret code for the {name} archive is")
    answer = tok(f" {number}.")
    others = [tok(f" The secret code for the {n} archive is {rng.randint(10000, 99999)}.")
              for n in rng.sample([x for x in _ARCHIVES if x != name], distractors)
              ] if distractors else []
    budget = max_tokens - len(tok.lead) - len(head) - len(num) - len(tail) - len(question) \
        - len(answer) - sum(map(len, others))
    if budget < 16:
        raise ProfileError(f"max_tokens (--max-tokens) is {max_tokens}, too short for a "
                           "needle task; use at least 128")
    hay: list[list[int]] = []
    used = 0
    for i, piece in enumerate(prose_pieces(rng)):
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
    for d in others:  # distractors anywhere, the target's position follows them
        at = rng.randrange(len(hay) + 1)
        hay.insert(at, d)
        cut += at < cut
    before = [t for s in hay[:cut] for t in s]
    after = [t for s in hay[cut:] for t in s]
    start = len(tok.lead) + len(before) + len(head)
    prompt = tok.lead + before + head + num + tail + after + question
    ids = prompt + answer
    return NeedleSample(ids=ids, needle=list(range(start, start + len(num))),
                         queries=list(range(len(prompt) - 1, len(ids) - 1)))
