"""Calibration prose: deterministic synthetic texts, or the user's own files."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from redknot_vllm.profiler.scores import ProfileError
from redknot_vllm.texts import TextsError
from redknot_vllm.texts import load_texts as shared_load_texts

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


def prose_pieces(rng: random.Random) -> Iterator[str]:
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
        pieces = prose_pieces(random.Random(f"redknot-profile-calibration/{seed}/{i}"))
        text = ""
        while len(text) < min_chars:
            text += next(pieces)
        out.append(text)
    return out


def load_texts(path: str | Path) -> list[str]:
    """Calibration texts from a folder of ``.txt`` files, a ``.txt`` file or a ``.jsonl``
    ("text"), through the package's one loader (:func:`redknot_vllm.texts.load_texts`)."""
    try:
        return [str(t) for t in shared_load_texts(path, "texts (--texts):")]
    except TextsError as e:
        raise ProfileError(str(e)) from None
