"""A request's reuse options (``kv_transfer_params["redknot"]``) and what the scheduler
hands the worker about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redknot_vllm.config import RedKnotConfigError

PARAMS_KEY = "redknot"
"""``kv_transfer_params[PARAMS_KEY]`` carries a request's reuse options."""


@dataclass(frozen=True)
class Use:
    """One stored segment at one place in a prompt."""

    digest: str
    start: int
    """Position of the segment's first token in the prompt."""
    length: int
    fraction: float | None = None
    """The request's ``recompute_fraction`` (None: the engine's ``reuse.recompute_fraction``)."""


@dataclass(frozen=True)
class Capture:
    """Read a request's KV back when its prompt is done: store it, or probe a segment."""

    req_id: str
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    probe: tuple[str, int] | None = None
    """(digest, offset): compare the tokens at ``[offset, offset + L)`` with segment digest."""
    ranges: tuple[tuple[int, int], ...] = ()
    """Store these ``[start, end)`` ranges of the prompt (in-context KV, ``store_marked``)
    instead of the whole prompt."""


@dataclass
class RequestParams:
    """``kv_transfer_params["redknot"]``, parsed."""

    reuse: str | list[tuple[int, int]] = "auto"
    """``auto`` (find stored segments by content), ``off``, or marked ``[start, end)`` ranges."""
    store: bool = False
    """Store this prompt's KV when its prompt is done (``redknot precompute`` sends it)."""
    probe: tuple[str, int] | None = None
    """(digest, offset): measure the deviation of a stored segment placed at ``offset``."""
    recompute_fraction: float | None = None
    """This request's share of each segment recomputed (None: the engine's)."""


def parse_params(kv_transfer_params: dict[str, Any] | None) -> RequestParams:
    """Validate ``kv_transfer_params["redknot"]``; a bad value is an error naming the field."""
    raw = (kv_transfer_params or {}).get(PARAMS_KEY)
    if raw is None:
        return RequestParams()
    where = f'kv_transfer_params["{PARAMS_KEY}"]'
    if not isinstance(raw, dict):
        raise RedKnotConfigError(f"{where} must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"reuse", "store", "probe", "recompute_fraction"})
    if unknown:
        raise RedKnotConfigError(f"{where}: unknown key(s) {unknown}; expected reuse, store, "
                                 "probe, recompute_fraction")
    out = RequestParams()
    reuse = raw.get("reuse", "auto")
    if reuse in ("auto", "off"):
        out.reuse = reuse
    elif isinstance(reuse, list) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r)
            and 0 <= r[0] < r[1] for r in reuse):
        out.reuse = [(int(a), int(b)) for a, b in reuse]
    else:
        raise RedKnotConfigError(f'{where}["reuse"] is {reuse!r}; expected "auto", "off" or '
                                 "a list of [start, end) token ranges")
    out.store = raw.get("store", False)
    if not isinstance(out.store, bool):
        raise RedKnotConfigError(f'{where}["store"] must be true or false')
    probe = raw.get("probe")
    if probe is not None:
        if not (isinstance(probe, dict) and isinstance(probe.get("digest"), str)
                and isinstance(probe.get("offset"), int) and probe["offset"] > 0):
            raise RedKnotConfigError(f'{where}["probe"] must be {{"digest": str, "offset": '
                                     "int > 0}")
        out.probe = (probe["digest"], probe["offset"])
    frac = raw.get("recompute_fraction")
    if frac is not None:
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            raise RedKnotConfigError(f'{where}["recompute_fraction"] is {frac!r}; expected a '
                                     "number in [0, 1] (the engine's reuse.recompute_fraction "
                                     "when absent)")
        out.recompute_fraction = float(frac)
    return out


def request_params(kv_transfer_params: dict[str, Any] | None, *, request_id: str,
                   wants_prompt_logprobs: bool, logger: Any) -> RequestParams:
    """:func:`parse_params` for a live request: a bad value is logged and reuse is off for
    it (the request itself runs); prompt logprobs turn reuse off too (skipped tokens have
    no hidden states to score)."""
    try:
        params = parse_params(kv_transfer_params)
    except RedKnotConfigError as e:
        logger.error("RedKnot request %s: %s; reuse off for it", request_id, e)
        return RequestParams(reuse="off")
    if wants_prompt_logprobs and params.reuse != "off":
        logger.warning("RedKnot request %s asks for prompt logprobs; KV reuse off for it",
                       request_id)
        params.reuse = "off"
    return params
