"""Offline KV reuse: a document's KV computed once, relocated by RoPE, spliced into vLLM pages.

vLLM's scheduler only knows a computed *prefix* per request, so stored segments in the middle
of a prompt cannot be claimed as external tokens. RedKnot lets vLLM schedule every token and
skips the work itself:

* **Plan** (scheduler side, :class:`ReuseEngine.plan`): stored segments are found in the
  prompt by content (their first 16 tokens, then every token compared), or taken from the
  ranges a request marks. A request that reuses anything gets its prefix-cache block hashes
  salted from its first computed block on (:func:`salt_block_hashes`), so its approximate
  KV can never serve an exact-prefix hit.
* **Splice** (worker, :class:`ReuseWorker.begin_forward`, before the model runs): for the
  step's tokens inside a segment, the stored K is relocated from ``[0, L)`` to its position
  with the model's own rotary cache (:mod:`redknot_vllm.relocation`), and K/V are written
  into the request's pages for every layer.
* **Skip**: under the ``selective`` policy the model then runs only the tokens that are not
  reused (plus the recomputed ones): the step's attention metadata is restricted to those
  rows (:func:`redknot_vllm.attention.backend.restrict_tokens`), so each run of computed
  tokens attends to the spliced KV before it. The ``seed`` policy computes every token and
  overwrites the local heads' KV of reused tokens before attention.
* **Capture** (:meth:`ReuseWorker.end_forward`): a request sent with
  ``kv_transfer_params={"redknot": {"store": true}}`` has its KV read back from its pages when
  its prompt is done and stored; ``{"probe": {"digest": d, "offset": p}}`` measures how far
  the stored KV of ``d`` is from the KV the same tokens get after ``p`` tokens of unrelated
  context, per token (the ``deviation`` the selective policy recomputes by).

Computing a token is always valid (its fresh KV overwrites the spliced one), so every
fallback computes: a segment evicted between plan and splice, CUDA-graph steps, rows whose
tokens would all be dropped. Each fallback is logged once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.logger import init_logger

from redknot_vllm.config import RedKnotConfig, RedKnotConfigError, ReuseConfig
from redknot_vllm.kv_store import Segment, SegmentKey, SegmentStore, read_key, segment_file
from redknot_vllm.relocation import check_relocatable, relocate_keys, relocation_rows

if TYPE_CHECKING:
    from redknot_vllm.attention.plan import LayerPlan

logger = init_logger(__name__)

PARAMS_KEY = "redknot"
"""``kv_transfer_params[PARAMS_KEY]`` carries a request's reuse options."""
ANCHOR = 16
"""Segments are looked up by their first ``ANCHOR`` tokens."""


# --------------------------------------------------------------------------- requests
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
    reuse: str | list[tuple[int, int]] = "auto"
    store: bool = False
    probe: tuple[str, int] | None = None
    recompute_fraction: float | None = None


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


# ---------------------------------------------------------------------------- catalog
class Catalog:
    """Stored segments by their first :data:`ANCHOR` tokens, for matching prompts."""

    def __init__(self) -> None:
        self._by_anchor: dict[tuple[int, ...], dict[str, tuple[int, ...]]] = {}
        self._by_tokens: dict[tuple[int, ...], str] = {}
        self._ids: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self._by_tokens)

    def add(self, key: SegmentKey, digest: str) -> None:
        self._by_anchor.setdefault(key.token_ids[:ANCHOR], {})[digest] = key.token_ids
        self._by_tokens[key.token_ids] = digest
        self._ids[digest] = key.token_ids

    def digests(self) -> set[str]:
        return set(self._ids)

    def discard(self, digest: str) -> None:
        ids = self._ids.pop(digest, None)
        if ids is not None:
            self._by_tokens.pop(ids, None)
            self._by_anchor.get(ids[:ANCHOR], {}).pop(digest, None)

    def exact(self, tokens: Sequence[int]) -> str | None:
        return self._by_tokens.get(tuple(tokens))

    def find(self, tokens: Sequence[int], start: int) -> list[Use]:
        """Leftmost-longest non-overlapping stored segments in ``tokens[start:]``."""
        uses: list[Use] = []
        i, n = start, len(tokens)
        while i + ANCHOR <= n:
            cands = self._by_anchor.get(tuple(tokens[i:i + ANCHOR]))
            best = None
            for digest, ids in (cands or {}).items():
                if (len(ids) <= n - i and (best is None or len(ids) > best.length)
                        and tuple(tokens[i:i + len(ids)]) == ids):
                    best = Use(digest, i, len(ids))
            if best is None:
                i += 1
            else:
                uses.append(best)
                i += best.length
        return uses


# ----------------------------------------------------------------------------- engine
class SegmentCatalog:
    """Scheduler side: which segments exist for this model and head config, read from the
    store's disk tier (the worker writes every segment through to it, and may run in another
    process), re-read when the store's index changes."""

    def __init__(self, cfg: ReuseConfig, key_fields: dict[str, str]) -> None:
        self.cfg = cfg
        self.key_fields = key_fields
        self.dir = Path(store_dir(cfg))
        self.catalog = Catalog()
        self._mtime: float | None = None
        self.refresh()
        logger.info("RedKnot KV reuse: %d stored segment(s) for this model and head config in "
                    "%s (policy %s)", len(self.catalog), self.dir, cfg.policy)

    def refresh(self) -> None:
        import json

        index = self.dir / "index.json"
        try:
            mtime = index.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            digests = set(json.loads(index.read_text())["segments"])
        except (OSError, ValueError, KeyError):
            return  # mid-replace or damaged: the worker's store repairs it; retry next time
        known = self.catalog.digests()
        for d in known - digests:
            self.catalog.discard(d)
        for d in digests - known:
            try:
                key = read_key(segment_file(self.dir, d))
            except Exception:  # a bad file is reported by the worker's store when loaded
                continue
            if all(getattr(key, k) == v for k, v in self.key_fields.items()):
                self.catalog.add(key, d)

    def plan(self, prompt: Sequence[int], start: int, params: RequestParams) -> list[Use]:
        """Segments this request reuses at positions ``>= start`` (its prefix-cache hit)."""
        return self.plan_and_misses(prompt, start, params)[0]

    def plan_and_misses(self, prompt: Sequence[int], start: int, params: RequestParams
                        ) -> tuple[list[Use], list[tuple[int, int]]]:
        """(segments reused, marked ranges to store because they are not stored yet)."""
        if params.store or params.probe is not None or params.reuse == "off":
            return [], []
        self.refresh()
        if isinstance(params.reuse, list):
            uses, misses = [], []
            for a, b in params.reuse:
                if b > len(prompt) or a < start:
                    logger.warning("RedKnot reuse range [%d, %d) is outside the computed part "
                                   "of the prompt [%d, %d); computed instead", a, b, start,
                                   len(prompt))
                    continue
                digest = self.catalog.exact(prompt[a:b])
                if digest is None:
                    if self.cfg.store_marked and b - a >= self.cfg.min_tokens:
                        misses.append((a, b))
                        logger.info("RedKnot reuse range [%d, %d) is not stored; computed "
                                    "and stored from this request (store_marked)", a, b)
                    else:
                        logger.info("RedKnot reuse range [%d, %d) is not stored; computed "
                                    "(store it with `redknot precompute`)", a, b)
                    continue
                uses.append(Use(digest, a, b - a, params.recompute_fraction))
            return uses, misses
        if not self.cfg.auto or not len(self.catalog):
            return [], []
        return [replace(u, fraction=params.recompute_fraction)
                for u in self.catalog.find(prompt, start) if u.length >= self.cfg.min_tokens], []


class ReuseEngine:
    """Worker side: the segment store and the key space."""

    def __init__(self, cfg: ReuseConfig, key_fields: dict[str, str], bos_token_id: int | None,
                 device: torch.device | None) -> None:
        self.cfg = cfg
        self.key_fields = key_fields
        self.bos_token_id = bos_token_id
        self.device = device
        self.store = SegmentStore(gpu_bytes=cfg.gpu_bytes if device is not None else 0,
                                  host_bytes=cfg.host_bytes, disk_dir=store_dir(cfg),
                                  disk_bytes=cfg.disk_bytes, device=device)

    def key(self, token_ids: Sequence[int]) -> SegmentKey:
        ids = tuple(int(t) for t in token_ids)
        return SegmentKey(bos=bool(ids) and ids[0] == self.bos_token_id, token_ids=ids,
                          **self.key_fields)

    def put(self, segment: Segment) -> str:
        """Write through to disk (the scheduler's catalog reads it), keep a memory copy."""
        self.store.put(segment, "disk")
        self.store.put(segment)
        return segment.key.digest()


def store_dir(cfg: ReuseConfig) -> str:
    from redknot_vllm import envs

    return cfg.store_dir or str(envs.cache_dir() / "kv-segments")


def reuse_setup(vllm_config: Any) -> tuple[ReuseConfig, dict[str, str]] | None:
    """An engine's reuse options and segment key space (None if reuse is off); validates the
    setup."""
    cfg = RedKnotConfig.from_additional_config(vllm_config.additional_config)
    if cfg is None or cfg.reuse is None:
        return None
    if cfg.head_config is None:
        raise RedKnotConfigError("reuse needs a head config (additional_config['redknot']"
                                 "['head_config']); an all-global one reuses under dense "
                                 "attention")
    par = vllm_config.parallel_config
    if par.tensor_parallel_size * par.pipeline_parallel_size != 1:
        raise RedKnotConfigError(
            "RedKnot KV reuse runs with tensor_parallel_size=1 and pipeline_parallel_size=1; "
            f"got {par.tensor_parallel_size} and {par.pipeline_parallel_size}")
    from redknot_vllm.fingerprint import FingerprintError, model_fingerprint

    mc = vllm_config.model_config
    dtype = str(mc.dtype).removeprefix("torch.")
    if str(vllm_config.load_config.load_format) == "dummy":
        # random weights (speed runs) are a function of the config and the seed
        import hashlib
        import json

        blob = json.dumps([mc.hf_config.to_dict(), dtype, mc.seed], sort_keys=True, default=str)
        fp = "dummy-" + hashlib.sha256(blob.encode()).hexdigest()
    else:
        try:
            fp = model_fingerprint(mc.model, dtype)
        except FingerprintError as e:
            raise RedKnotConfigError(f"KV reuse keys segments by the model's weights: {e}"
                                     ) from e
    hf = mc.hf_text_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return cfg.reuse, {
        "model_fingerprint": fp,
        "head_config_hash": cfg.head_config.content_hash(),
        "tokenizer": f"{Path(str(mc.tokenizer)).name}|{mc.tokenizer_mode}",
        "layout": f"L{hf.num_hidden_layers}xH{hf.num_key_value_heads}xD{head_dim}|{dtype}|tp1",
    }


def catalog_for(vllm_config: Any) -> SegmentCatalog | None:
    setup = reuse_setup(vllm_config)
    return None if setup is None else SegmentCatalog(*setup)


def engine_for(vllm_config: Any) -> ReuseEngine | None:
    """The worker's :class:`ReuseEngine`; None if reuse is off."""
    setup = reuse_setup(vllm_config)
    if setup is None:
        return None
    from vllm.platforms import current_platform

    device = torch.device("cuda") if current_platform.is_cuda() else None
    hf = vllm_config.model_config.hf_text_config
    return ReuseEngine(*setup, getattr(hf, "bos_token_id", None), device)


def salt_block_hashes(request: Any, from_block: int, salt: str) -> None:
    """Re-key a request's prefix-cache block hashes from ``from_block`` on.

    Each hash already chains its whole prefix, so ``sha256(salt | hash)`` names (salt, prefix)
    uniquely; later blocks chain from the salted hash through vLLM's own hasher. Blocks before
    ``from_block`` are the request's exact prefix-cache hit and keep their hashes.
    """
    import hashlib

    hashes = request.block_hashes
    for i in range(from_block, len(hashes)):
        hashes[i] = type(hashes[i])(hashlib.sha256(salt.encode() + bytes(hashes[i])).digest())


# ----------------------------------------------------------------------------- worker
def recompute_mask(segment: Segment, cfg: ReuseConfig,
                   fraction: float | None = None) -> torch.Tensor:
    """Host bool ``[L]``: the segment's tokens to recompute under the selective policy
    (``fraction`` overrides ``cfg.recompute_fraction``)."""
    n = len(segment.key.token_ids)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:cfg.recompute_first] = True
    frac = cfg.recompute_fraction if fraction is None else fraction
    # the fraction is of the whole segment, its first tokens included, so that it means the
    # same share for a 1K-token document as for an 8K one
    extra = max(0, round((frac * n - min(cfg.recompute_first, n)) / cfg.chunk))
    if extra and segment.deviation is not None:
        dev = segment.deviation.float().cpu()
        pad = (-n) % cfg.chunk
        score = torch.nn.functional.pad(dev, (0, pad)).view(-1, cfg.chunk).mean(1)
        score[: math.ceil(cfg.recompute_first / cfg.chunk)] = -1  # already recomputed
        for c in score.topk(min(extra, score.numel())).indices.tolist():
            mask[c * cfg.chunk:(c + 1) * cfg.chunk] = True
    elif extra:
        logger.warning_once("RedKnot reuse: a stored segment has no deviation scores (stored "
                            "without `redknot precompute`'s probe); only its first %d tokens "
                            "are recomputed", cfg.recompute_first)
    return mask


def _write_kv(kv_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              heads: torch.Tensor | None = None) -> None:
    """Write ``k``/``v`` ``[n, H, D]`` at ``slots`` of a logical ``[blocks, H, bs, 2D]`` cache
    (optionally only ``heads``)."""
    bs, d = kv_cache.shape[2], k.shape[-1]
    blocks, offs = slots // bs, slots % bs
    if heads is None:
        kv_cache[blocks, :, offs, :d] = k
        kv_cache[blocks, :, offs, d:] = v
    else:
        kv_cache[blocks[:, None], heads[None, :], offs[:, None], :d] = k[:, heads]
        kv_cache[blocks[:, None], heads[None, :], offs[:, None], d:] = v[:, heads]


def _gather(caches: list[torch.Tensor], block_ids: Sequence[int], start: int, end: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[layers, end - start, H, D]`` of a request's positions ``[start, end)``,
    read from its pages in every layer's logical ``[blocks, H, bs, 2D]`` cache."""
    bs, d = caches[0].shape[2], caches[0].shape[3] // 2
    pos = torch.arange(start, end)
    blocks = torch.tensor(block_ids)[pos // bs].to(caches[0].device)
    offs = (pos % bs).to(caches[0].device)
    kv = torch.stack([c[blocks, :, offs] for c in caches])  # [layers, n, H, 2D]
    return kv[..., :d], kv[..., d:]


@dataclass
class SplicedKV:
    """The reused tokens of one step: where they go and where their stored KV is.

    K is relocated one layer at a time (:meth:`layer`), so a 64K-token splice never holds
    more than one layer's relocated keys; the token indices and the rotation rows are
    built once per step, on the first layer."""

    slots: torch.Tensor
    """[n] destination slots."""
    parts: list[tuple[Segment, torch.Tensor, int]]
    """(segment, token offsets in it (host), segment start position), in slot order."""
    rotary: Any
    layer_row: dict[int, int] = field(default_factory=dict)
    """layer index -> index into the segments' layer dimension."""
    _step: tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, init=False, repr=False)

    def _prepare(self) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        if self._step is None:
            dev = self.slots.device
            offs = [o.to(dev, non_blocking=True) for _, o, _ in self.parts]
            src = torch.cat(offs)
            dst = torch.cat([o + start for o, (_, _, start) in zip(offs, self.parts,
                                                                   strict=True)])
            self._step = offs, relocation_rows(self.rotary, src, dst)
        return self._step

    def layer(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Relocated K and V ``[n, H, D]`` of one layer, on the slots' device."""
        dev = self.slots.device
        offs, rows = self._prepare()
        # a host-tier segment crosses PCIe one whole layer at a time, then is gathered
        ks = [seg.k[row].to(dev, non_blocking=True)[o] for (seg, _, _), o in zip(
            self.parts, offs, strict=True)]
        vs = [seg.v[row].to(dev, non_blocking=True)[o] for (seg, _, _), o in zip(
            self.parts, offs, strict=True)]
        k = relocate_keys(torch.cat(ks), 0, 0, self.rotary, rows=rows)
        return k, torch.cat(vs)


def overwrite_local_heads(ow: SplicedKV, plan: LayerPlan, kv_cache: torch.Tensor) -> None:
    """Seed policy: called by the attention layer after its cache write, before attention."""
    from redknot_vllm.kernels.headclass_attention import FULL

    heads = [h for g in plan.groups if g.window != FULL for h in g.kv_heads]
    row = ow.layer_row.get(plan.layer)
    if heads and row is not None:
        k, v = ow.layer(row)
        _write_kv(kv_cache, ow.slots, k, v, torch.tensor(heads, device=kv_cache.device))


class ReuseWorker:
    """Worker half of reuse, driven by the model's forward (see the module docstring)."""

    def __init__(self, engine: ReuseEngine, model: torch.nn.Module, vllm_config: Any) -> None:
        self.engine = engine
        self.cfg = engine.cfg
        self.vllm_config = vllm_config
        inner = model.model  # type: ignore[attr-defined]
        self.rotary = inner.layers[inner.start_layer].self_attn.rotary_emb
        check_relocatable(self.rotary)
        self._layer_names: list[str] | None = None
        self._masks: dict[tuple[str, str, int], torch.Tensor] = {}

    def layer_names(self) -> list[str]:
        """RedKnot attention layer names in layer order."""
        if self._layer_names is None:
            from redknot_vllm.attention.backend import RedKnotAttentionImpl

            ctx = self.vllm_config.compilation_config.static_forward_context
            named = [(m.impl.plan.layer, name) for name, m in ctx.items()
                     if isinstance(getattr(m, "impl", None), RedKnotAttentionImpl)]
            self._layer_names = [name for _, name in sorted(named)]
        return self._layer_names

    def _kv_caches(self) -> list[torch.Tensor]:
        ctx = self.vllm_config.compilation_config.static_forward_context
        return [ctx[n].kv_cache for n in self.layer_names()]

    @staticmethod
    def _meta() -> Any:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        from redknot_vllm.connector import RedknotConnector

        if not has_kv_transfer_group():
            return None
        conn = get_kv_transfer_group()
        if not isinstance(conn, RedknotConnector) or not conn.has_connector_metadata():
            return None
        return conn._get_connector_metadata()

    def begin_forward(self) -> torch.Tensor | None:
        """Splice this step's reused KV; return the token indices to compute, or None (all)."""
        meta = self._meta()
        if meta is None or not meta.reuse:
            return None
        from vllm.forward_context import get_forward_context

        from redknot_vllm.attention.backend import RedKnotAttentionMetadata, restrict_tokens

        fc = get_forward_context()
        names = self.layer_names()
        md = fc.attn_metadata.get(names[0]) if isinstance(fc.attn_metadata, dict) else None
        if not isinstance(md, RedKnotAttentionMetadata) or not md.has_prefill:
            return None
        if self.cfg.policy == "selective" and _cudagraph_step(fc):
            logger.warning_once("RedKnot reuse: a CUDA-graph step computes its reused tokens")
            return None
        firsts = md.first_slots()
        keep = torch.ones(md.num_actual_tokens, dtype=torch.bool)
        tok_idx: list[torch.Tensor] = []
        parts: list[tuple[Segment, torch.Tensor, int]] = []
        reused: dict[int, list[tuple[int, int]]] = {}
        for r, slot in enumerate(firsts):
            hit = meta.reuse.get(slot)
            if hit is None or not md.is_prefill[r]:
                continue
            req_id, prompt_len, uses = hit
            q0, q1 = md.query_start_loc[r], md.query_start_loc[r + 1]
            c = md.seq_lens[r] - (q1 - q0)  # position of the row's first token
            for u in uses:
                a, b = max(u.start, c), min(u.start + u.length, c + q1 - q0)
                if a >= b:
                    continue
                found = self.engine.store.lookup(u.digest)
                if found is None:
                    logger.warning("RedKnot reuse: segment %s… is no longer stored; its %d "
                                   "tokens are computed", u.digest[:12], b - a)
                    continue
                seg = found[0]
                offs = torch.arange(a - u.start, b - u.start)
                if self.cfg.policy == "selective":
                    mkey = (req_id, u.digest, u.start)
                    if mkey not in self._masks:
                        self._masks[mkey] = recompute_mask(seg, self.cfg, u.fraction)
                    offs = offs[~self._masks[mkey][offs]]
                offs = offs[offs + u.start != prompt_len - 1]  # its logits are sampled
                if not offs.numel():
                    continue
                t = q0 + (offs + u.start - c)
                tok_idx.append(t)
                parts.append((seg, offs, u.start))
                reused.setdefault(slot, []).extend(_ranges(offs + u.start))
        if not tok_idx:
            return None
        t_all = torch.cat(tok_idx)
        dev = md.slot_mapping.device
        spliced = SplicedKV(md.slot_mapping[t_all.to(dev)], parts, self.rotary,
                            {li: i for i, li in enumerate(sorted(self._plan_layers()))})
        if self.cfg.policy == "seed":
            md.reuse_overwrite = spliced
            return None
        md.reused = reused
        for i, cache in enumerate(self._kv_caches()):
            _write_kv(cache, spliced.slots, *spliced.layer(i))
        keep[t_all] = False
        if not bool(keep.any()):
            keep[-1] = True  # a step computes at least one token
        new_md, kept = restrict_tokens(md, keep)
        for name in names:
            fc.attn_metadata[name] = new_md
            fc.slot_mapping[name] = new_md.slot_mapping
        from redknot_vllm.runtime import find_runtime

        rt = find_runtime(self.vllm_config)
        if rt is not None:
            rt.replace_step(md, new_md)
        return kept

    def forget(self, req_ids: set[str]) -> None:
        """Drop finished requests' recompute masks."""
        if self._masks:
            self._masks = {k: m for k, m in self._masks.items() if k[0] not in req_ids}

    def _plan_layers(self) -> list[int]:
        from redknot_vllm.runtime import find_runtime

        rt = find_runtime(self.vllm_config)
        return list(rt.plans) if rt is not None else []

    def end_forward(self) -> None:
        """Store or probe the prompts that finished this step (their KV is complete)."""
        meta = self._meta()
        if meta is None or not meta.capture:
            return
        caches = self._kv_caches()
        for cap in meta.capture.values():
            if cap.ranges:
                self._store_ranges(cap, caches)
                continue
            start = 0 if cap.probe is None else cap.probe[1]
            k, v = _gather(caches, cap.block_ids, start, len(cap.token_ids))
            if cap.probe is None:
                self._store(cap, k, v)
            else:
                self._probe(cap, k, v)

    def _store_ranges(self, cap: Capture, caches: list[torch.Tensor]) -> None:
        """store_marked: ranges of a finished prompt, moved back to ``[0, L)``."""
        for a, b in cap.ranges:
            k, v = _gather(caches, cap.block_ids, a, b)
            k = relocate_keys(k, a, 0, self.rotary)
            digest = self.engine.put(Segment(
                self.engine.key(cap.token_ids[a:b]), k.contiguous(), v.contiguous(),
                meta={"source": f"in-context at {a} of request {cap.req_id}"}))
            logger.info("RedKnot store_marked: tokens [%d, %d) stored as %s…", a, b,
                        digest[:12])

    def _store(self, cap: Capture, k: torch.Tensor, v: torch.Tensor) -> None:
        ids = cap.token_ids
        if len(ids) < self.cfg.min_tokens:
            logger.warning("RedKnot store: request %s has %d prompt tokens (minimum %d); not "
                           "stored", cap.req_id, len(ids), self.cfg.min_tokens)
            return
        seg = Segment(self.engine.key(ids), k.contiguous(), v.contiguous(),
                      meta={"source": "prefilled alone at [0, L)"})
        digest = self.engine.put(seg)
        logger.info("RedKnot store: %d tokens stored as %s…", len(ids), digest[:12])

    def _probe(self, cap: Capture, k: torch.Tensor, v: torch.Tensor) -> None:
        assert cap.probe is not None
        digest, offset = cap.probe
        found = self.engine.store.lookup(digest, k.device)
        if found is None or found[0].k.shape[1] != k.shape[1]:
            logger.warning("RedKnot probe: segment %s… missing or of another length; no "
                           "deviation recorded", digest[:12])
            return
        seg = found[0]
        n = k.shape[1]
        ref_k = relocate_keys(seg.k.to(k.device), 0, offset, self.rotary)
        dk = (k.float() - ref_k.float()).norm(dim=-1) / ref_k.float().norm(dim=-1).clamp_min(1e-6)
        dv = ((v.float() - seg.v.to(v.device).float()).norm(dim=-1)
              / seg.v.to(v.device).float().norm(dim=-1).clamp_min(1e-6))
        deviation = ((dk + dv) / 2).mean(dim=(0, 2)).cpu()  # [n]: over layers and heads
        assert deviation.numel() == n
        self.engine.put(Segment(seg.key, seg.k, seg.v, deviation,
                                {**seg.meta, "deviation": f"probe offset {offset}"}))


def _cudagraph_step(fc: Any) -> bool:
    mode = getattr(fc, "cudagraph_runtime_mode", None)
    return mode is not None and getattr(mode, "name", "NONE") != "NONE"


def _ranges(pos: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted positions (host tensor) -> [start, end) runs."""
    if not pos.numel():
        return []
    breaks = (torch.diff(pos) != 1).nonzero().flatten()
    starts = torch.cat([pos[:1], pos[breaks + 1]]).tolist()
    ends = torch.cat([pos[breaks] + 1, pos[-1:] + 1]).tolist()
    return list(zip(starts, ends, strict=True))


# ------------------------------------------------------------------------- precompute
DEFAULT_PROBE = (
    "The passages below were retrieved from several unrelated sources for a question that "
    "follows them. Some of them may be irrelevant. Read every passage before answering.\n\n")
"""Context put in front of a document to measure how context-dependent its KV is."""


def precompute(llm: Any, docs: Sequence[str | Sequence[int]], *,
               probe: str | Sequence[int] | None = DEFAULT_PROBE,
               progress: bool = True) -> list[str]:
    """Store each document's KV, prefilled alone at ``[0, L)``, and its deviation profile.

    Args:
        llm: a ``vllm.LLM`` built with ``engine_args(..., reuse=...)``.
        docs: texts (tokenized without special tokens) or token id lists.
        probe: context for the deviation probe (text or ids); None skips the probe, and the
            selective policy then recomputes only each segment's first tokens.
        progress: vLLM's progress bars.

    Returns:
        The segments' digests, in ``docs`` order.
    """
    from vllm import SamplingParams

    from redknot_vllm.kv_store import SegmentKey

    vcfg = llm.llm_engine.vllm_config
    setup = reuse_setup(vcfg)
    if setup is None:
        raise RedKnotConfigError("precompute needs an engine built with engine_args(..., "
                                 "reuse=...)")
    min_tokens, fields_ = setup[0].min_tokens, setup[1]

    def encode(text: str) -> list[int]:
        return list(llm.get_tokenizer()(text, add_special_tokens=False)["input_ids"])

    ids = [encode(d) if isinstance(d, str) else [int(t) for t in d] for d in docs]
    short = [i for i, x in enumerate(ids) if len(x) < min_tokens]
    if short:
        raise RedKnotConfigError(f"documents {short[:5]} have fewer than reuse.min_tokens="
                                 f"{min_tokens} tokens; they are not worth storing")
    bos = getattr(vcfg.model_config.hf_text_config, "bos_token_id", None)
    digests = [SegmentKey(bos=x[0] == bos, token_ids=tuple(x), **fields_).digest() for x in ids]

    def params(p: dict[str, Any]) -> Any:
        return SamplingParams(max_tokens=1, temperature=0.0,
                              extra_args={"kv_transfer_params": {PARAMS_KEY: p}})

    llm.generate([{"prompt_token_ids": x} for x in ids], params({"store": True}),
                 use_tqdm=progress)
    if probe is not None:
        pre = encode(probe) if isinstance(probe, str) else [int(t) for t in probe]
        llm.generate([{"prompt_token_ids": pre + x} for x in ids],
                     [params({"probe": {"digest": d, "offset": len(pre)}}) for d in digests],
                     use_tqdm=progress)
    return digests


def read_docs(path: str | Path) -> list[str | list[int]]:
    """Documents from a folder of ``.txt`` files, a ``.txt`` file, or a ``.jsonl`` with a
    ``"text"`` or ``"token_ids"`` field per line."""
    import json

    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise RedKnotConfigError(f"--docs {p}: the folder has no .txt files")
        return [f.read_text() for f in files]
    if p.suffix == ".jsonl":
        out: list[str | list[int]] = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if isinstance(rec.get("text"), str):
                out.append(rec["text"])
            elif isinstance(rec.get("token_ids"), list):
                out.append([int(t) for t in rec["token_ids"]])
            else:
                raise RedKnotConfigError(f"--docs {p} line {n}: needs a \"text\" string or a "
                                         "\"token_ids\" list")
        return out
    if p.is_file():
        return [p.read_text()]
    raise RedKnotConfigError(f"--docs {p}: no such folder or file (.txt or .jsonl)")
