"""A request's reuse options (``kv_transfer_params["redknot"]``) and what the scheduler
hands the worker about them."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redknot_vllm.config import (
    RECOMPUTE_SELECT,
    RedKnotConfigError,
    ReuseConfig,
    is_int,
    is_number,
)
from redknot_vllm.logs import RateLimited

PARAMS_KEY = "redknot"
"""``kv_transfer_params[PARAMS_KEY]`` carries a request's reuse options."""
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Use:
    """One stored segment at one place in a prompt."""

    digest: str
    start: int
    """Position of the segment's first token in the prompt."""
    length: int
    fraction: float | None = None
    """The request's ``recompute_fraction`` (None: the engine's ``reuse.recompute_fraction``)."""
    focus: tuple[int, ...] = ()
    """``recompute_select="question"``: the segment's chunks (of ``reuse.chunk`` tokens)
    that share the most with this request's question, most first; recomputed before the
    deviation's picks (:func:`redknot_vllm.reuse.policy.question_focus`)."""
    blend: bool = False
    """``recompute_select="blend"``: after its first tokens, the recomputed chunks are chosen
    in the forward from this request's KV deviation (:mod:`redknot_vllm.reuse.blend`)."""


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
    behind_context: bool = False
    """The range is a document after the engine's ``reuse.store_context`` (``"store":
    {"after": n}``), not a marked range."""


@dataclass
class RequestParams:
    """``kv_transfer_params["redknot"]``, parsed."""

    reuse: str | list[tuple[int, int]] = "auto"
    """``auto`` (find stored segments by content), ``off``, or marked ``[start, end)`` ranges."""
    store: bool = False
    """Store this prompt's KV when its prompt is done (``redknot precompute`` sends it)."""
    store_after: int = 0
    """``"store": {"after": n}``: store only the tokens after the first ``n``, the engine's
    ``reuse.store_context`` (moved back to ``[0, L - n)``)."""
    probe: tuple[str, int] | None = None
    """(digest, offset): measure the deviation of a stored segment placed at ``offset``."""
    recompute_fraction: float | None = None
    """This request's share of each segment recomputed (None: the engine's)."""
    recompute_select: str | None = None
    """This request's ``reuse.recompute_select`` (None: the engine's)."""


def parse_params(kv_transfer_params: Any) -> RequestParams:
    """Validate the types of ``kv_transfer_params["redknot"]``; a bad value is an error
    naming the field. :func:`check_request` then checks the values against the prompt."""
    if kv_transfer_params is None:
        return RequestParams()
    if not isinstance(kv_transfer_params, dict):
        raise RedKnotConfigError(f"kv_transfer_params must be an object, got "
                                 f"{type(kv_transfer_params).__name__}")
    raw = kv_transfer_params.get(PARAMS_KEY)
    if raw is None:
        return RequestParams()
    where = f'kv_transfer_params["{PARAMS_KEY}"]'
    if not isinstance(raw, dict):
        raise RedKnotConfigError(f"{where} must be an object, got {type(raw).__name__}")
    unknown = sorted(map(str, set(raw) - {"reuse", "store", "probe", "recompute_fraction",
                                          "recompute_select"}))
    if unknown:
        raise RedKnotConfigError(f"{where}: unknown key(s) {unknown[:8]}; expected reuse, "
                                 "store, probe, recompute_fraction, recompute_select")
    out = RequestParams()
    reuse = raw.get("reuse", "auto")
    if isinstance(reuse, str) and reuse in ("auto", "off"):
        out.reuse = reuse
    elif isinstance(reuse, list) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(is_int(x) for x in r)
            and 0 <= r[0] < r[1] for r in reuse):
        out.reuse = [(int(a), int(b)) for a, b in reuse]
    else:
        shown = repr(reuse) if len(repr(reuse)) < 80 else repr(reuse)[:77] + "..."
        raise RedKnotConfigError(f'{where}["reuse"] is {shown}; expected "auto", "off" or '
                                 "a list of [start, end) token ranges")
    store = raw.get("store", False)
    if isinstance(store, dict) and set(store) == {"after"} and is_int(store["after"]) \
            and store["after"] > 0:
        out.store, out.store_after = True, int(store["after"])
    elif isinstance(store, bool):
        out.store = store
    else:
        raise RedKnotConfigError(f'{where}["store"] must be true, false or {{"after": n}} '
                                 "(n > 0 tokens of the engine's reuse.store_context first)")
    probe = raw.get("probe")
    if probe is not None:
        if not (isinstance(probe, dict) and isinstance(probe.get("digest"), str)
                and _DIGEST.fullmatch(probe["digest"]) and is_int(probe.get("offset"))
                and probe["offset"] > 0):
            raise RedKnotConfigError(f'{where}["probe"] must be {{"digest": a segment\'s '
                                     '64-hex sha256, "offset": int > 0}')
        out.probe = (probe["digest"], probe["offset"])
    frac = raw.get("recompute_fraction")
    if frac is not None:
        if not is_number(frac) or not 0 <= frac <= 1:
            raise RedKnotConfigError(f'{where}["recompute_fraction"] is {frac!r}; expected a '
                                     "number in [0, 1] (the engine's reuse.recompute_fraction "
                                     "when absent)")
        out.recompute_fraction = float(frac)
    select = raw.get("recompute_select")
    if select is not None:
        if select not in RECOMPUTE_SELECT:
            raise RedKnotConfigError(f'{where}["recompute_select"] is {select!r}; expected one '
                                     f"of {list(RECOMPUTE_SELECT)} (the engine's "
                                     "reuse.recompute_select when absent)")
        out.recompute_select = select
    return out


def check_request(params: RequestParams, prompt_len: int, cfg: ReuseConfig,
                  stored_length: Callable[[str], int | None]) -> None:
    """Check a parsed request against its prompt and the engine's store, in the scheduler,
    before anything reaches a worker. ``stored_length(digest)`` is the length of a stored
    segment of this engine, or None. Raises :class:`RedKnotConfigError` naming the field."""
    where = f'kv_transfer_params["{PARAMS_KEY}"]'
    if isinstance(params.reuse, list):
        ranges = sorted(params.reuse)
        if len(ranges) > cfg.max_marked_ranges:
            raise RedKnotConfigError(f'{where}["reuse"] marks {len(ranges)} ranges; this engine '
                                     f"takes at most reuse.max_marked_ranges="
                                     f"{cfg.max_marked_ranges}")
        if ranges and ranges[-1][1] > prompt_len:
            raise RedKnotConfigError(f'{where}["reuse"] range {list(ranges[-1])} ends past '
                                     f"the prompt's {prompt_len} tokens")
        for (_, b), (c, _) in itertools.pairwise(ranges):
            if c < b:
                raise RedKnotConfigError(f'{where}["reuse"] ranges overlap (one ends at {b}, '
                                         f"the next starts at {c})")
        params.reuse = ranges
    writes = params.store or params.probe is not None
    if writes and not cfg.client_store:
        raise RedKnotConfigError(
            f'{where}: "store" and "probe" write segments, and this engine does not let '
            "requests write (reuse.client_store is off); store documents with `redknot "
            "precompute`")
    if params.store and (cfg.store_context is None) != (params.store_after == 0):
        raise RedKnotConfigError(
            f'{where}["store"]: this engine stores documents '
            + ("behind its reuse.store_context, so a store request sends the context first "
               'and {"after": <its token count>} (`redknot precompute` does this)'
               if cfg.store_context is not None else
               'prefilled alone (no reuse.store_context), so "store" is true, not '
               '{"after": n}'))
    if params.store_after and prompt_len - params.store_after < cfg.min_tokens:
        raise RedKnotConfigError(f'{where}["store"]["after"] is {params.store_after}: fewer '
                                 f"than reuse.min_tokens={cfg.min_tokens} of the prompt's "
                                 f"{prompt_len} tokens are left to store")
    if writes and prompt_len - params.store_after > cfg.max_store_tokens:
        raise RedKnotConfigError(f"{where}: a request may store at most "
                                 f"reuse.max_store_tokens={cfg.max_store_tokens} tokens; this "
                                 f"prompt has {prompt_len - params.store_after}"
                                 + (" after the store context" if params.store_after else ""))
    if params.probe is not None:
        digest, offset = params.probe
        if offset >= prompt_len:
            raise RedKnotConfigError(f'{where}["probe"]["offset"] is {offset}, not inside the '
                                     f"prompt's {prompt_len} tokens")
        length = stored_length(digest)
        if length is None:
            raise RedKnotConfigError(f'{where}["probe"]["digest"] {digest[:12]}... is not a '
                                     "stored segment of this model and head config")
        if length != prompt_len - offset:
            raise RedKnotConfigError(f'{where}["probe"]: the segment has {length} tokens but '
                                     f"the prompt holds {prompt_len - offset} after the offset")


def request_params(kv_transfer_params: Any, *, request_id: str, prompt_len: int,
                   cfg: ReuseConfig, stored_length: Callable[[str], int | None],
                   wants_prompt_logprobs: bool, log: RateLimited) -> RequestParams:
    """:func:`parse_params` and :func:`check_request` for a live request: anything wrong is
    logged (rate-limited) and reuse is off for it, the request itself runs; prompt logprobs
    turn reuse off too (skipped tokens have no hidden states to score)."""
    try:
        params = parse_params(kv_transfer_params)
        check_request(params, prompt_len, cfg, stored_length)
    except RedKnotConfigError as e:
        log.warning("bad-params", "RedKnot request %s: %s; reuse off for it", request_id, e)
        return RequestParams(reuse="off")
    if wants_prompt_logprobs and params.reuse != "off":
        log.warning("prompt-logprobs", "RedKnot request %s asks for prompt logprobs; KV reuse "
                    "off for it", request_id)
        params.reuse = "off"
    return params
