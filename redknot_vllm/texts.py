"""The one text loader: documents or calibration texts from a folder, a ``.txt`` or a ``.jsonl``.

Used by ``redknot profile --texts`` (calibration prose) and ``redknot precompute --docs``
(documents to store). Every defect is a :class:`TextsError` naming the option, the file and,
for ``.jsonl``, the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from redknot_vllm.errors import RedKnotError


class TextsError(RedKnotError, ValueError):
    """Texts that cannot be read; the message names the option and the file."""


def load_texts(path: str | Path, option: str, *, token_ids: bool = False,
               max_token_id: int | None = None) -> list[str | list[int]]:
    """Texts from a folder of ``.txt`` files (sorted by name), one ``.txt`` file, or a
    ``.jsonl`` with a ``"text"`` string (or, with ``token_ids``, a ``"token_ids"`` list of
    ints in ``[0, max_token_id)``) per line. Blank lines of a ``.jsonl`` are skipped;
    blank texts are dropped. Files must be UTF-8.

    Args:
        option: the command-line option or argument the path came from, for messages.
    """
    p = Path(path).expanduser()
    fix = ("pass a folder of .txt files, a .txt file or a .jsonl file with a \"text\" field "
           "per line")
    if not p.exists():
        raise TextsError(f"{option} {p} does not exist; {fix}")
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        texts: list[str | list[int]] = [_read(f, option) for f in files]
    elif not p.is_file():
        raise TextsError(f"{option} {p}: not a regular file or folder; {fix}")
    elif p.suffix == ".jsonl":
        texts = _jsonl(p, option, token_ids, max_token_id)
    else:
        texts = [_read(p, option)]
    texts = [t for t in texts if not isinstance(t, str) or t.strip()]
    if not texts:
        raise TextsError(f"{option} {p} holds no non-empty text; {fix}")
    return texts


def _read(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextsError(f"{option} {path}: not UTF-8 text (byte {e.start}); pass text "
                         "files") from None
    except OSError as e:
        raise TextsError(f"{option} {path}: cannot read it ({e.strerror})") from None


def _jsonl(p: Path, option: str, token_ids: bool, max_token_id: int | None
           ) -> list[str | list[int]]:
    out: list[str | list[int]] = []
    want = '"text" string' + (' or a "token_ids" list' if token_ids else "")
    for n, line in enumerate(_read(p, option).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TextsError(f"{option} {p} line {n} is not JSON: {e.msg}") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            out.append(row["text"])
        elif token_ids and isinstance(row, dict) and isinstance(row.get("token_ids"), list):
            ids = row["token_ids"]
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                        or t < 0 or (max_token_id is not None and t >= max_token_id)), None)
            if bad is not None or not ids:
                limit = "" if max_token_id is None else f" below the vocabulary size {max_token_id}"
                raise TextsError(f"{option} {p} line {n}: \"token_ids\" must be a non-empty list "
                                 f"of integers >= 0{limit}; found {bad!r}")
            out.append([int(t) for t in ids])
        else:
            what = "a \"text\" field" if not token_ids else want
            raise TextsError(f"{option} {p} line {n} has no string \"text\" field"
                             if not token_ids else f"{option} {p} line {n}: needs {what}")
    return out
