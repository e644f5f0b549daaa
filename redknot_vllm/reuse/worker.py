"""Worker half of reuse: splice stored KV before a step's forward, store or probe after it.

Driven by the connector's worker half: :meth:`ReuseWorker.splice` from ``start_load_kv``
(before the forward), :meth:`ReuseWorker.capture` from ``wait_for_save`` (after it). What
the model must know (which tokens to run) goes into the runtime's step state; nothing here
is called from inside the forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger

from redknot_vllm import compat
from redknot_vllm.attention.metadata import first_slots, restrict_tokens
from redknot_vllm.config import RedKnotConfigError
from redknot_vllm.kernels.paged_kv import read_kv, slots_of
from redknot_vllm.kv_store import Segment, SegmentStore
from redknot_vllm.logs import RateLimited
from redknot_vllm.relocation import check_relocatable, relocate_keys
from redknot_vllm.reuse.blend import BlendGroup, BlendPlan, blend_chunks, kv_deviation
from redknot_vllm.reuse.keys import ReuseSetup
from redknot_vllm.reuse.params import Capture, Use
from redknot_vllm.reuse.policy import recompute_mask
from redknot_vllm.reuse.splice import SplicedKV
from redknot_vllm.step import StepState

logger = init_logger(__name__)

StepPlan = dict[int, tuple[str, int, list[Use]]]
"""Request first slot -> (request id, prompt length, its segments inside this step)."""


@dataclass
class _LocalKV:
    """SegPaged: the local heads' KV of a prompt that will be stored or probed, gathered
    step by step (its local pages leave the window and are freed before the prompt ends)."""

    k: torch.Tensor
    """[layers, prompt_len, local KV heads, D]"""
    v: torch.Tensor
    filled: torch.Tensor
    """[prompt_len] bool: positions computed (or spliced) in this engine's steps."""


class ReuseWorker:
    """The segment store and the per-step splice of one worker."""

    def __init__(self, setup: ReuseSetup, rotary: torch.nn.Module,
                 layers: Sequence[tuple[int, str]], device: torch.device | None,
                 local: tuple[Sequence[str], int] | None = None) -> None:
        """
        Args:
            rotary: the model's rotary embedding (every layer shares its cache).
            layers: (layer index, attention layer name) of the RedKnot layers, in order;
                segments store their KV in this order.
            device: the GPU tier's device (None: no GPU tier).
            local: SegPaged: the local heads' layer names (in ``layers``' order) and the
                number of global KV heads per layer. A segment keeps every head, the
                global ones first; the splice writes each group's heads at its own slots.
        """
        check_relocatable(rotary)
        self.setup = setup
        self.cfg = setup.cfg
        self.rotary = rotary
        self.device = device
        self.layer_names = [name for _, name in layers]
        self.layer_row = {li: i for i, (li, _) in enumerate(layers)}
        self.store = self._open_store(self.cfg.gpu_bytes, self.cfg.host_bytes)
        self._caches: list[torch.Tensor] = []
        self.log = RateLimited(logger)
        self._masks: dict[tuple[str, str, int], torch.Tensor] = {}
        self.local_names = list(local[0]) if local else []
        self.kv_global = local[1] if local else 0
        self._local_caches: list[torch.Tensor] = []
        self._local_kv: dict[str, _LocalKV] = {}
        self._unrestricted: tuple[Any, Any] | None = None
        """This step's metadata of both groups before the splice restricted them."""
        self._blend_owners: tuple[list[Any], list[Any], Any, list[int]] | None = None
        """A blended step's parts, their owners, SegPaged's local metadata and the step's
        first slots, from the splice to :meth:`blend_restrict`."""

    def _open_store(self, gpu_bytes: int, host_bytes: int) -> SegmentStore:
        try:
            return SegmentStore(gpu_bytes=gpu_bytes if self.device is not None else 0,
                                host_bytes=host_bytes, disk_dir=self.setup.store_dir,
                                disk_bytes=self.cfg.disk_bytes, device=self.device)
        except (OSError, ValueError) as e:
            raise RedKnotConfigError(f"KV reuse cannot open its store reuse.store_dir "
                                     f"{self.setup.store_dir}: {e}") from e

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """The engine's paged caches, by attention layer name (from the connector)."""
        self._caches = [kv_caches[name] for name in self.layer_names]
        self._local_caches = [kv_caches[name] for name in self.local_names]

    def put(self, segment: Segment) -> str:
        """Write through to disk (the scheduler's catalog reads it), keep a memory copy."""
        self.store.put(segment, write_through=True)
        return segment.key.digest()

    # ------------------------------------------------------------- before the forward
    def splice(self, step: StepState | None, plan: StepPlan, forward_context: Any) -> None:
        """Write this step's reused KV into its pages and restrict the step to the tokens
        still computed (selective), or hand the attention layers the KV to overwrite their
        local heads with (seed). Results go into ``step``.

        Never raises: a request whose segments fail is computed, and a failure of the step's
        splice computes the whole step (every computed token's fresh KV overwrites whatever
        was spliced, so a half-written splice is harmless); both are logged."""
        if step is None or not plan:
            return
        try:
            self._splice(step, plan, forward_context)
        except Exception as e:
            self.log.error("splice-failed", "RedKnot reuse: splicing a step failed (%s: %s); "
                           "its tokens are computed", type(e).__name__, e, exc_info=True)

    def _splice(self, step: StepState, plan: StepPlan, forward_context: Any) -> None:
        md = step.attn
        if compat.step_attention_metadata(forward_context, self.layer_names[0]) is not md:
            logger.warning_once("RedKnot reuse: this step's attention metadata is not the "
                                "one planned (micro-batching?); its reused tokens are computed")
            return
        if self.cfg.policy == "selective" and compat.is_cudagraph_step(forward_context):
            logger.warning_once("RedKnot reuse: a CUDA-graph step computes its reused tokens")
            return
        md_l = None
        if self.local_names:
            md_l = compat.step_attention_metadata(forward_context, self.local_names[0])
            if md_l is None or md_l.num_actual_tokens != md.num_actual_tokens:
                logger.warning_once("RedKnot reuse: SegPaged's local group has no metadata "
                                    "matching this step's; its reused tokens are computed")
                return
        tok_idx: list[torch.Tensor] = []
        parts: list[tuple[Segment, torch.Tensor, int]] = []
        # per part: its request's first slot and the blend group (None: not blended)
        owners: list[tuple[int, BlendGroup | None]] = []
        n_cand = 0
        firsts = step.first_slots()
        for r, slot in enumerate(firsts):
            hit = plan.get(slot)
            if hit is None or not md.is_prefill_cpu[r]:
                continue
            req_id, prompt_len, uses = hit
            q0, q1 = md.query_start_loc_cpu[r], md.query_start_loc_cpu[r + 1]
            c = md.seq_lens_cpu[r] - (q1 - q0)  # position of the row's first token
            row_idx, row_parts, row_owners = [], [], []
            try:
                for u in uses:
                    found = self._reused_offsets(req_id, prompt_len, u, c, c + q1 - q0)
                    if found is None:
                        continue
                    seg, offs = found
                    group = None
                    if u.blend and self.cfg.policy == "selective":
                        group = self._blend_group(seg, u, offs, n_cand)
                    row_idx.append(q0 + (offs + u.start - c))
                    row_parts.append((seg, offs, u.start))
                    row_owners.append((slot, group))
                    n_cand += len(offs)
            except Exception as e:
                n_cand -= sum(len(o) for _, o, _ in row_parts)
                self.log.error("request-failed", "RedKnot reuse: request %s failed (%s: %s); it "
                               "is computed", req_id, type(e).__name__, e, exc_info=True)
                continue
            tok_idx += row_idx
            parts += row_parts
            owners += row_owners
        if not tok_idx:
            return
        t_all = torch.cat(tok_idx)
        t_dev = t_all.to(md.slot_mapping.device)
        spliced = SplicedKV(md.slot_mapping[t_dev], parts, self.rotary, self.layer_row,
                            local_slots=None if md_l is None else md_l.slot_mapping[t_dev],
                            kv_global=self.kv_global)
        if self.cfg.policy == "seed":
            step.kv_overwrite = spliced
            return
        spliced.write_all_heads(self._caches, self._local_caches if md_l is not None
                                else None)
        groups = [g for _, g in owners if g is not None]
        if groups and self._blend_ready(step):
            # the forward runs the first layers on every token, then calls blend_restrict;
            # the tokens of segments not blended are candidates never picked
            step.blend = BlendPlan(self.cfg.blend_layers, t_all, spliced.slots, groups,
                                   spliced)
            self._blend_owners = (parts, owners, md_l, firsts)
            return
        self._restrict(step, forward_context, t_all, parts, owners, md_l, firsts,
                       torch.zeros(len(t_all), dtype=torch.bool))

    def _restrict(self, step: StepState, forward_context: Any, t_all: torch.Tensor,
                  parts: list[tuple[Segment, torch.Tensor, int]],
                  owners: list[tuple[int, BlendGroup | None]], md_l: Any,
                  firsts: list[int], recompute: torch.Tensor) -> None:
        """Restrict the step to the tokens computed: all but the spliced ones ``t_all``
        that ``recompute`` (host bool, same order) does not name; ``firsts``: the
        unrestricted step's first slots (one transfer, taken by the splice)."""
        md = step.attn
        keep = torch.ones(md.num_actual_tokens, dtype=torch.bool)
        keep[t_all[~recompute]] = False
        if not bool(keep.any()):
            keep[-1] = True  # a step computes at least one token
        reused: dict[int, list[tuple[int, int]]] = {}
        i = 0
        for (_, offs, start), (slot, _) in zip(parts, owners, strict=True):
            left = offs[~recompute[i:i + len(offs)]]
            i += len(offs)
            if left.numel():
                reused.setdefault(slot, []).extend(_ranges(left + start))
        new_md, kept, row_firsts = restrict_tokens(md, keep, firsts)
        if md_l is not None:
            # the same runs in the local group (its own block table and slots)
            self._unrestricted = (md, md_l)
            compat.set_step_attention_metadata(forward_context, self.local_names,
                                               restrict_tokens(md_l, keep, firsts)[0])
        compat.set_step_attention_metadata(forward_context, self.layer_names, new_md)
        step.attn, step.compute_index, step.row_first_slots = new_md, kept, row_firsts
        step.reused = reused
        step.rows_changed()  # blend restricts half-way through the forward

    # ----------------------------------------------------------------------- blend
    def _blend_group(self, seg: Segment, u: Use, offs: torch.Tensor, start: int
                     ) -> BlendGroup:
        """The blend choice of one segment in this step: its candidates (``offs``, the
        tokens spliced) and how many of their chunks are recomputed: the segment's share
        beyond its first tokens, of this step's chunks (so a segment split over steps gets
        its share in each, and a share of 1 recomputes everything)."""
        n = len(seg.key.token_ids)
        first = min(self.cfg.recompute_first, n)
        frac = self.cfg.recompute_fraction if u.fraction is None else u.fraction
        share = min(1.0, max(0.0, (frac * n - first) / max(1, n - first)))
        ids = offs // self.cfg.chunk
        return BlendGroup(start, ids, round(share * len(torch.unique(ids))))

    def _blend_ready(self, step: StepState) -> bool:
        """Whether the forward can blend this step (else it is restricted at once, each
        blended segment recomputing its first tokens only: logged)."""
        row = self.layer_row.get(self.cfg.blend_layers - 1)
        if row is None or self.cfg.blend_layers >= len(self.layer_names):
            logger.warning_once(
                "RedKnot reuse: recompute_select 'blend' needs reuse.blend_layers (%d) below "
                "the model's %d layers on one pipeline stage; blended segments recompute only "
                "their first tokens", self.cfg.blend_layers, len(self.layer_names))
            return False
        return True

    def blend_restrict(self, step: StepState, forward_context: Any) -> torch.Tensor | None:
        """Called by the forward after the first ``blend_layers`` layers ran on every
        token: pick each blended segment's most deviating chunks, restrict the step to
        them (and every token not spliced); returns the kept token indices (None: all).

        A failure keeps every token computed for the rest of the forward (exact, logged)."""
        plan, owned, self._blend_owners = step.blend, self._blend_owners, None
        try:
            if plan is None or owned is None:
                raise RuntimeError("no blend plan of this step's splice")
            parts, owners, md_l, firsts = owned
            row = self.layer_row[plan.layers - 1]
            k, v = read_kv(self._caches[row:row + 1], plan.slots)
            sk, sv = plan.spliced.layer(row)
            h = k.shape[2]  # SegPaged: the global heads' cache holds the first h heads
            dev = kv_deviation(k[0], v[0], sk[:, :h], sv[:, :h])
            recompute = blend_chunks(dev, plan.groups)
            self._restrict(step, forward_context, plan.token_index, parts, owners, md_l,
                           firsts, recompute)
        except Exception as e:
            self.log.error("blend-failed", "RedKnot reuse: the blend choice failed (%s: %s); "
                           "the step computes every token", type(e).__name__, e,
                           exc_info=True)
            return None
        return step.compute_index

    def _reused_offsets(self, req_id: str, prompt_len: int, u: Use, a: int, b: int
                        ) -> tuple[Segment, torch.Tensor] | None:
        """The stored segment and its token offsets reused in positions ``[a, b)``."""
        a, b = max(u.start, a), min(u.start + u.length, b)
        if a >= b:
            return None
        found = self.store.lookup(u.digest)
        if found is None:
            logger.warning("RedKnot reuse: segment %s… is no longer stored; its %d tokens are "
                           "computed", u.digest[:12], b - a)
            return None
        seg = found[0]
        offs = torch.arange(a - u.start, b - u.start)
        if self.cfg.policy == "selective":
            mkey = (req_id, u.digest, u.start)
            if mkey not in self._masks:
                # blend: the first tokens only (a share of 0); the rest is chosen in the forward
                self._masks[mkey] = recompute_mask(seg, self.cfg, 0.0 if u.blend else u.fraction,
                                                   () if u.blend else u.focus)
            offs = offs[~self._masks[mkey][offs]]
        offs = offs[offs + u.start != prompt_len - 1]  # its logits are sampled
        return (seg, offs) if offs.numel() else None

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop finished requests' recompute masks (and SegPaged's gathered local KV)."""
        gone = set(req_ids)
        if self._masks and gone:
            self._masks = {k: m for k, m in self._masks.items() if k[0] not in gone}
        for rid in gone:
            self._local_kv.pop(rid, None)

    # -------------------------------------------------------------- after the forward
    def after_step(self, gathering: Mapping[int, tuple[str, int]],
                   captures: Iterable[Capture]) -> None:
        """After a step's forward: SegPaged gathers the local heads' KV of the prompts
        still to be stored or probed (``gathering``: first slot -> (request id, prompt
        length)), then the prompts that finished store or probe (:meth:`capture`). Called
        after every step, so a splice's unrestricted metadata never outlives its step."""
        try:
            if self.local_names and gathering:
                try:
                    self._gather_local(gathering)
                except Exception as e:
                    for rid, _ in gathering.values():
                        self._local_kv.pop(rid, None)
                    self.log.error("gather-failed", "RedKnot reuse: reading SegPaged's local "
                                   "KV failed (%s: %s); those prompts are not stored",
                                   type(e).__name__, e, exc_info=True)
            if captures:
                self.capture(captures)
        finally:
            self._unrestricted = self._blend_owners = None

    def _gather_local(self, gathering: Mapping[int, tuple[str, int]]) -> None:
        """Copy this step's tokens' local-head KV of the gathering prompts, read at the
        local group's slots (the pages leave the window, and are freed, before the prompt
        ends); the splice's restriction is undone by reading the unrestricted metadata."""
        if self._unrestricted is not None:
            md, md_l = self._unrestricted
        else:
            fc = compat.current_forward_context()
            md = None if fc is None else compat.step_attention_metadata(fc, self.layer_names[0])
            md_l = None if fc is None else compat.step_attention_metadata(
                fc, self.local_names[0])
        if md is None or md_l is None:
            raise RuntimeError("no attention metadata of this step after its forward")
        cache = self._local_caches[0]
        for r, slot in enumerate(first_slots(md)):
            hit = gathering.get(slot)
            if hit is None:
                continue
            req_id, prompt_len = hit
            q0, q1 = md.query_start_loc_cpu[r], md.query_start_loc_cpu[r + 1]
            c = md.seq_lens_cpu[r] - (q1 - q0)
            n = min(q1 - q0, prompt_len - c)
            if n <= 0:
                continue
            buf = self._local_kv.get(req_id)
            if buf is None or buf.k.shape[1] != prompt_len:
                shape = (len(self._local_caches), prompt_len, cache.shape[1],
                         cache.shape[3] // 2)
                buf = self._local_kv[req_id] = _LocalKV(
                    torch.empty(shape, dtype=cache.dtype, device=cache.device),
                    torch.empty(shape, dtype=cache.dtype, device=cache.device),
                    torch.zeros(prompt_len, dtype=torch.bool))
            k, v = read_kv(self._local_caches, md_l.slot_mapping[q0:q0 + n])
            buf.k[:, c:c + n], buf.v[:, c:c + n] = k, v
            buf.filled[c:c + n] = True

    def capture(self, captures: Iterable[Capture]) -> None:
        """Store or probe the prompts that finished this step (their KV is complete). A
        failure is logged and that capture skipped; nothing a request sent can raise here."""
        for cap in captures:
            try:
                self._capture(cap)
            except Exception as e:
                self.log.error("capture-failed", "RedKnot reuse: storing or probing request %s "
                               "failed (%s: %s); nothing stored", cap.req_id, type(e).__name__,
                               e, exc_info=True)
            finally:
                self._local_kv.pop(cap.req_id, None)

    def _capture(self, cap: Capture) -> None:
        if cap.ranges:
            self._store_ranges(cap)
            return
        start = 0 if cap.probe is None else cap.probe[1]
        k, v = self._read(cap, start, len(cap.token_ids))
        if cap.probe is None:
            self._store(cap, k, v)
        else:
            self._probe(cap, k, v)

    def _read(self, cap: Capture, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[layers, end - start, H, D]`` of a request's positions ``[start, end)``
        (SegPaged: the global heads from their pages, the local ones as gathered)."""
        pos = torch.arange(start, end)
        k, v = read_kv(self._caches, slots_of(cap.block_ids, pos, self._caches[0].shape[2]))
        if not self.local_names:
            return k, v
        buf = self._local_kv.get(cap.req_id)
        if buf is None or buf.k.shape[1] < end or not bool(buf.filled[start:end].all()):
            raise RuntimeError(
                f"SegPaged: the local heads' KV of positions [{start}, {end}) was not all "
                "computed in this engine's steps (a prefix-cache hit: those local pages are "
                "freed); send the prompt with a cache_salt of its own to store it")
        return (torch.cat([k, buf.k[:, start:end].to(k.device)], dim=2),
                torch.cat([v, buf.v[:, start:end].to(v.device)], dim=2))

    def _store_ranges(self, cap: Capture) -> None:
        """store_marked (or a document behind the store context): ranges of a finished
        prompt, moved back to ``[0, L)``."""
        for a, b in cap.ranges:
            k, v = self._read(cap, a, b)
            k = relocate_keys(k, a, 0, self.rotary)
            source = ("computed behind reuse.store_context" if cap.behind_context
                      else f"in-context at {a} of request {cap.req_id}")
            digest = self.put(Segment(
                self.setup.key(cap.token_ids[a:b]), k.contiguous(), v.contiguous(),
                meta={"source": source}))
            logger.info("RedKnot %s: tokens [%d, %d) stored as %s…",
                        "store" if cap.behind_context else "store_marked", a, b, digest[:12])

    def _store(self, cap: Capture, k: torch.Tensor, v: torch.Tensor) -> None:
        ids = cap.token_ids
        if len(ids) < self.cfg.min_tokens:
            logger.warning("RedKnot store: request %s has %d prompt tokens (minimum %d); not "
                           "stored", cap.req_id, len(ids), self.cfg.min_tokens)
            return
        seg = Segment(self.setup.key(ids), k.contiguous(), v.contiguous(),
                      meta={"source": "prefilled alone at [0, L)"})
        digest = self.put(seg)
        logger.info("RedKnot store: %d tokens stored as %s…", len(ids), digest[:12])

    def _probe(self, cap: Capture, k: torch.Tensor, v: torch.Tensor) -> None:
        """Record how far a stored segment's KV is from its KV behind the probe's context
        (the ``deviation`` the selective policy recomputes by)."""
        assert cap.probe is not None
        digest, offset = cap.probe
        found = self.store.lookup(digest, k.device)
        if found is None or found[0].k.shape[1] != k.shape[1]:
            logger.warning("RedKnot probe: segment %s… missing or of another length; no "
                           "deviation recorded", digest[:12])
            return
        seg = found[0]  # on k's device
        n = k.shape[1]
        # each fp32 copy made once: at 32K tokens a layer stack of K or V is hundreds of MB
        ref_k = relocate_keys(seg.k, 0, offset, self.rotary).float()
        deviation = kv_deviation(k, v, ref_k, seg.v.float()).mean(dim=0).cpu()  # over layers
        assert deviation.numel() == n
        # the KV is stored already: only the scores are written (a sidecar on disk), so a
        # precomputed segment's file is written once, by its store request
        if self.store.set_deviation(seg.key, deviation.float().contiguous(),
                                    {"deviation": f"probe offset {offset}"}) is None:
            logger.warning("RedKnot probe: segment %s… was evicted during its probe; no "
                           "deviation recorded", digest[:12])

    # ------------------------------------------------------------------ benchmarks
    def reopen_store(self, gpu_bytes: int, host_bytes: int) -> dict[str, Any]:
        """Reopen the store with other memory-tier limits (every segment stays on disk);
        returns the old store's stats."""
        stats = self.store.stats()
        self.store = None  # type: ignore[assignment]
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.store = self._open_store(gpu_bytes, host_bytes)
        return stats


def _ranges(pos: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted positions (host tensor) -> [start, end) runs."""
    if not pos.numel():
        return []
    breaks = (torch.diff(pos) != 1).nonzero().flatten()
    starts = torch.cat([pos[:1], pos[breaks + 1]]).tolist()
    ends = torch.cat([pos[breaks] + 1, pos[-1:] + 1]).tolist()
    return list(zip(starts, ends, strict=True))
