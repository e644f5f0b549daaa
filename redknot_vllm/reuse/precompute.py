"""``redknot precompute``: store documents' KV, each prefilled alone (or behind the engine's
``reuse.store_context``), with its deviation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redknot_vllm.config import RedKnotConfigError, ReuseConfig
from redknot_vllm.kv_store import deviation_file, segment_file
from redknot_vllm.reuse.keys import reuse_setup
from redknot_vllm.reuse.params import PARAMS_KEY
from redknot_vllm.texts import TextsError, load_texts

DEFAULT_PROBE = (
    "The passages below were retrieved from several unrelated sources for a question that "
    "follows them. Some of them may be irrelevant. Read every passage before answering.\n\n")
"""Context put in front of a document to measure how context-dependent its KV is."""


def precompute(llm: Any, docs: Sequence[str | Sequence[int]], *,
               probe: str | Sequence[int] | None = DEFAULT_PROBE,
               progress: bool = True, force: bool = False) -> list[str]:
    """Store each document's KV, prefilled alone at ``[0, L)`` (or behind the engine's
    ``reuse.store_context``, then moved back there), and its deviation profile.

    Each segment file is written once, by its store request; the probe that follows adds
    the deviation as a small sidecar file
    (:meth:`~redknot_vllm.kv_store.SegmentStore.set_deviation`) instead of rewriting the
    KV. A document given twice is stored and probed once, and one whose segment file (and,
    with a probe, its deviation sidecar) is already in the disk tier is not stored again
    (``force`` stores it anyway). A file found there is verified when it is loaded, as any
    other: a damaged one is quarantined and its tokens computed, and the next
    ``precompute`` stores it again.

    Args:
        llm: a ``vllm.LLM`` built with ``engine_args(..., reuse=...)``.
        docs: texts (tokenized without special tokens) or token id lists.
        probe: context for the deviation probe (text or ids); None skips the probe, and the
            selective policy then recomputes only each segment's first tokens.
        progress: vLLM's progress bars.
        force: store and probe every document, also those already on disk.

    Returns:
        The segments' digests, in ``docs`` order.
    """
    from vllm import SamplingParams

    setup = reuse_setup(llm.llm_engine.vllm_config)
    if setup is None:
        raise RedKnotConfigError("precompute needs an engine built with engine_args(..., "
                                 "reuse=...)")
    if not setup.cfg.client_store:
        raise RedKnotConfigError(
            "precompute stores KV through the engine's requests, which needs "
            "reuse.client_store=true: engine_args(..., reuse={'client_store': True, ...}) "
            "(`redknot precompute` does this)")
    ids = encode_docs(_tokenizer_for(llm, docs), docs)
    check_docs(ids, setup.cfg, llm.llm_engine.model_config.get_vocab_size())
    ctx = setup.cfg.store_context
    ctx_ids = None if ctx is None else encode_docs(_tokenizer_for(llm, [ctx]), [ctx])[0]
    probe_ids = None if probe is None else encode_docs(_tokenizer_for(llm, [probe]),
                                                       [probe])[0]
    if ctx_ids is not None:
        if ctx_ids == probe_ids:
            raise RedKnotConfigError("reuse.store_context is precompute's probe text: behind "
                                     "it the probe would measure no deviation; give "
                                     "precompute another probe, or the engine another "
                                     "store_context")
        limit = llm.llm_engine.model_config.max_model_len
        over = [i for i, x in enumerate(ids) if len(ctx_ids) + len(x) > limit]
        if over:
            raise RedKnotConfigError(
                f"documents {over[:5]} do not fit behind reuse.store_context "
                f"({len(ctx_ids)} tokens) in the engine's max_model_len={limit}; shorten "
                "the context or the documents, or raise max_model_len")
    digests = [setup.key(x).digest() for x in ids]
    # one request per distinct segment: a repeated document would write its file again
    first: dict[str, int] = {}
    for i, d in enumerate(digests):
        first.setdefault(d, i)
    todo = [i for i in first.values() if force or not _on_disk(setup.store_dir, digests[i],
                                                               probe is not None)]

    def params(p: dict[str, Any]) -> Any:
        return SamplingParams(max_tokens=1, temperature=0.0,
                              extra_args={"kv_transfer_params": {PARAMS_KEY: p}})

    if not todo:
        return digests
    if ctx_ids is None:
        llm.generate([{"prompt_token_ids": ids[i]} for i in todo], params({"store": True}),
                     use_tqdm=progress)
    else:  # each document computed behind the context, stored without it
        llm.generate([{"prompt_token_ids": ctx_ids + ids[i]} for i in todo],
                     params({"store": {"after": len(ctx_ids)}}), use_tqdm=progress)
    if probe_ids is not None:
        llm.generate([{"prompt_token_ids": probe_ids + ids[i]} for i in todo],
                     [params({"probe": {"digest": digests[i], "offset": len(probe_ids)}})
                      for i in todo], use_tqdm=progress)
    return digests


def _on_disk(store_dir: Path, digest: str, with_deviation: bool) -> bool:
    """The segment's file (and its deviation sidecar, when one is wanted) exist."""
    return segment_file(store_dir, digest).is_file() and (
        not with_deviation or deviation_file(store_dir, digest).is_file())


def _tokenizer_for(llm: Any, docs: Sequence[str | Sequence[int]]) -> Any:
    """The engine's tokenizer when a document is text; None for token ids only, so an
    engine started with ``skip_tokenizer_init=True`` can store token-id documents."""
    if not any(isinstance(d, str) for d in docs):
        return None
    try:
        return llm.get_tokenizer()
    except ValueError as e:  # vLLM: "Tokenizer not available when skip_tokenizer_init=True"
        raise RedKnotConfigError(
            f"precompute was given text documents (or a text probe), but the engine has no "
            f"tokenizer ({e}); pass token id lists (and probe=<token ids> or probe=None), or "
            f"start the engine without skip_tokenizer_init") from None


def encode_docs(tokenizer: Any, docs: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Texts tokenized without special tokens; token id lists as they are."""
    return [list(tokenizer(d, add_special_tokens=False)["input_ids"]) if isinstance(d, str)
            else [int(t) for t in d] for d in docs]


def check_docs(ids: Sequence[Sequence[int]], cfg: ReuseConfig, vocab_size: int) -> None:
    """Refuse documents that cannot be stored, naming them, before any engine work."""
    short = [i for i, x in enumerate(ids) if len(x) < cfg.min_tokens]
    if short:
        raise RedKnotConfigError(f"documents {short[:5]} have fewer than reuse.min_tokens="
                                 f"{cfg.min_tokens} tokens; they are not worth storing")
    long = [i for i, x in enumerate(ids) if len(x) > cfg.max_store_tokens]
    if long:
        raise RedKnotConfigError(f"documents {long[:5]} have more than reuse.max_store_tokens="
                                 f"{cfg.max_store_tokens} tokens; split them or raise it")
    bad = [i for i, x in enumerate(ids) if any(not 0 <= t < vocab_size for t in x)]
    if bad:
        raise RedKnotConfigError(f"documents {bad[:5]} hold token ids outside the model's "
                                 f"vocabulary [0, {vocab_size})")


def read_docs(path: str | Path, vocab_size: int | None = None) -> list[str | list[int]]:
    """Documents from a folder of ``.txt`` files, a ``.txt`` file, or a ``.jsonl`` with a
    ``"text"`` or ``"token_ids"`` field per line."""
    try:
        return load_texts(path, "--docs", token_ids=True, max_token_id=vocab_size)
    except TextsError as e:
        raise RedKnotConfigError(str(e)) from None
