"""The RedKnot KV connector: per-request accounting and the offline KV reuse plan.

Selected with ``--kv-transfer-config '{"kv_connector": "RedknotConnector",
"kv_connector_module_path": "redknot_vllm.connector", "kv_role": "kv_both"}'`` (what
:func:`redknot_vllm.engine_args` and ``redknot serve`` add).

Hook contracts, in base-class order:

* Scheduler side (engine core): tracks each request's block ids and prompt length, and for
  every step emits ``first slot of the step's tokens -> (request id, prompt length)`` for
  requests still in their prompt. It claims no external tokens: with reuse on
  (:mod:`redknot_vllm.reuse`), ``get_num_new_matched_tokens`` plans which stored segments a
  prompt contains and salts its block hashes, and each step's metadata carries the segments
  inside that step's tokens and the prompts whose KV is to be stored or probed.
* Worker side: the model's forward reads the bound metadata to splice and skip reused tokens.
  After the forward (``wait_for_save``) the connector attributes the step's prefill rows to
  request ids by the slot of their first token (slots are unique among running requests),
  accumulates prefill FLOPs, kept FFN tokens and reused tokens per request, and when a
  prompt is done logs one line and keeps the result for :func:`request_stats`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.logger import init_logger

from redknot_vllm.config import RedKnotConfigError
from redknot_vllm.flops import PrefillFlops
from redknot_vllm.reuse import Capture, Use, catalog_for, parse_params, salt_block_hashes
from redknot_vllm.runtime import RedknotRuntime, find_runtime

if TYPE_CHECKING:
    import torch

logger = init_logger(__name__)

_SUFFIX = re.compile(r".+-[0-9a-f]{8}")
MAX_KEPT_RESULTS = 4096
"""Finished-request stats a worker keeps for :func:`request_stats` (oldest dropped)."""


@dataclass
class RedknotConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, per step."""

    by_first_slot: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    """slot of a request's first token this step -> (request id, prompt length,
    tokens already computed before its first step, e.g. prefix-cache hits)."""
    reuse: dict[int, tuple[str, int, list[Use]]] = field(default_factory=dict)
    """KV reuse: first slot -> (request id, prompt length, stored segments in this step)."""
    capture: dict[int, Capture] = field(default_factory=dict)
    """KV reuse: first slot -> a prompt finishing this step whose KV is stored or probed."""


class RedknotConnector(KVConnectorBase_V1, SupportsHMA):
    """See the module docstring."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._blocks: dict[str, list[int]] = {}
        self._prompt: dict[str, tuple[int, int]] = {}
        self._reuse = catalog_for(vllm_config) if role == KVConnectorRole.SCHEDULER else None
        self._uses: dict[str, list[Use]] = {}
        self._captures: dict[str, tuple[tuple[int, ...], tuple[str, int] | None,
                                        tuple[tuple[int, int], ...]]] = {}
        # worker side
        self._runtime: RedknotRuntime | None = None
        self._acc: dict[str, PrefillFlops] = {}
        self._cached: dict[str, int] = {}
        self.results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.suffixed: dict[str, list[str]] = {}
        """user-facing request id -> engine ids (vLLM appends ``-<8 hex>`` to make ids
        unique; ``RequestOutput.request_id`` is the unsuffixed one)."""

    # ------------------------------------------------------------ Scheduler-side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        # Claims nothing: reused segments sit mid-prompt, where vLLM has no "computed" state;
        # they are planned here and skipped in the model (redknot_vllm.reuse).
        rid = request.request_id
        if self._reuse is not None and rid not in self._uses:
            try:
                params = parse_params(request.kv_transfer_params)
            except RedKnotConfigError as e:
                logger.error("RedKnot request %s: %s; reuse off for it", rid, e)
                params = parse_params({"redknot": {"reuse": "off"}})
            prompt = request.prompt_token_ids or []
            sp = request.sampling_params
            if sp is not None and sp.prompt_logprobs is not None and params.reuse != "off":
                # skipped tokens have no hidden states to score
                logger.warning("RedKnot request %s asks for prompt logprobs; KV reuse off for "
                               "it", rid)
                params.reuse = "off"
            uses, misses = self._reuse.plan_and_misses(prompt, num_computed_tokens, params)
            self._uses[rid] = uses
            if uses:
                cfg = self._reuse.cfg
                salt = "|".join(["redknot-reuse", repr(cfg), *(f"{u.digest}@{u.start}~{u.fraction}"
                                                              for u in uses)])
                salt_block_hashes(request, num_computed_tokens // self._block_size, salt)
                logger.info("RedKnot request %s reuses %d stored segment(s), %d of %d prompt "
                            "tokens", rid, len(uses), sum(u.length for u in uses), len(prompt))
            if params.store or params.probe is not None or misses:
                self._captures[rid] = (tuple(prompt), params.probe, tuple(misses))
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = RedknotConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            prompt_len = (len(req.prompt_token_ids) if req.prompt_token_ids is not None
                          else int(req.prompt_embeds.shape[0]))
            self._blocks[req.req_id] = list(req.block_ids[0])
            self._prompt[req.req_id] = (prompt_len, req.num_computed_tokens)
            self._add(meta, req.req_id, req.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self._blocks[req_id] = list(new_blocks[0]) if new_blocks else []
                self._prompt[req_id] = (self._prompt[req_id][0], cached.num_computed_tokens[i])
            elif new_blocks:
                self._blocks.setdefault(req_id, []).extend(new_blocks[0])
            self._add(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _add(self, meta: RedknotConnectorMetadata, req_id: str, pos: int,
             scheduler_output: Any) -> None:
        prompt_len, first = self._prompt.get(req_id, (0, 0))
        blocks = self._blocks.get(req_id, [])
        if pos >= prompt_len or pos // self._block_size >= len(blocks):
            return  # decoding: nothing to account
        slot = blocks[pos // self._block_size] * self._block_size + pos % self._block_size
        meta.by_first_slot[slot] = (req_id, prompt_len, first)
        end = pos + scheduler_output.num_scheduled_tokens.get(req_id, 0)
        uses = [u for u in self._uses.get(req_id, ()) if u.start < end and u.start + u.length > pos]
        if uses:
            meta.reuse[slot] = (req_id, prompt_len, uses)
        if req_id in self._captures and end >= prompt_len:
            ids, probe, ranges = self._captures[req_id]
            meta.capture[slot] = Capture(req_id, ids, tuple(blocks), probe, ranges)

    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        self._blocks.pop(request.request_id, None)
        self._prompt.pop(request.request_id, None)
        self._uses.pop(request.request_id, None)
        self._captures.pop(request.request_id, None)
        return False, None

    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    # --------------------------------------------------------------- Worker-side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._runtime = find_runtime(self._vllm_config)
        if self._runtime is not None:
            self._runtime.per_request = True

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        if self._runtime is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, RedknotConnectorMetadata)
        for md in self._runtime.drain():
            # reused (not computed) positions, also of requests with no computed row here
            for slot, ranges in md.reused.items():
                hit = meta.by_first_slot.get(slot)
                if hit is not None:
                    acc = self._acc.setdefault(hit[0], PrefillFlops())
                    self._cached.setdefault(hit[0], hit[2])
                    for a, b in ranges:
                        acc.add_reused(self._runtime.dims, a, b)
            md.reused.clear()
            firsts = md.first_slots()
            kept = md.ffn_kept_host()
            for row, prefill in enumerate(md.is_prefill):
                hit = meta.by_first_slot.get(firsts[row]) if prefill else None
                if hit is None:
                    continue
                req_id, prompt_len, first = hit
                self._acc.setdefault(req_id, PrefillFlops()).merge(
                    self._runtime.row_flops(md, row, kept))
                self._cached.setdefault(req_id, first)
                if md.seq_lens[row] >= prompt_len:
                    self._finish(req_id, prompt_len)

    def _finish(self, req_id: str, prompt_len: int) -> None:
        acc = self._acc.pop(req_id)
        stats = {"request_id": req_id, "prompt_tokens": prompt_len,
                 "cached_tokens": self._cached.pop(req_id, 0), **acc.as_dict()}
        self.results[req_id] = stats
        if _SUFFIX.fullmatch(req_id):
            self.suffixed.setdefault(req_id.rsplit("-", 1)[0], []).append(req_id)
        while len(self.results) > MAX_KEPT_RESULTS:
            old, _ = self.results.popitem(last=False)
            base = old.rsplit("-", 1)[0]
            if old in self.suffixed.get(base, ()):
                self.suffixed[base].remove(old)
                if not self.suffixed[base]:
                    del self.suffixed[base]
        assert self._runtime is not None
        if self._runtime.tp_rank == 0:
            logger.info("RedKnot request %s: %d prompt tokens (%d computed, %d reused), FFN kept "
                        "%.1f%%, prefill FLOPs saved %.1f%%", req_id, prompt_len, acc.tokens,
                        acc.reused_tokens, 100 * acc.ffn_kept_fraction,
                        100 * acc.saved_fraction)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                set[str] | None]:
        for req_id in finished_req_ids:  # aborted mid-prompt: forget partial sums
            self._acc.pop(req_id, None)
            self._cached.pop(req_id, None)
        if self._runtime is not None and self._runtime.reuse is not None:
            self._runtime.reuse.forget(finished_req_ids)
        return None, None


class RedknotWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) so that ``collective_rpc`` can
    fetch results by method name; callables would need pickle-based RPC."""

    def redknot_worker_info(self) -> dict[str, Any]:
        """Where and how RedKnot runs in this worker (process id, model class, layers)."""
        import os

        from redknot_vllm.attention.backend import RedKnotAttentionImpl
        from redknot_vllm.runtime import find_runtime

        model = self.model_runner.model  # type: ignore[attr-defined]
        vllm_config = self.vllm_config  # type: ignore[attr-defined]
        ctx = vllm_config.compilation_config.static_forward_context
        return {
            "pid": os.getpid(),
            "model_class": type(model).__name__,
            "redknot_attention_layers": sum(
                isinstance(getattr(m, "impl", None), RedKnotAttentionImpl)
                for m in ctx.values()),
            "sparse_ffn_layers": sum(hasattr(m, "redknot_threshold") for m in ctx.values()),
            "runtime": find_runtime(vllm_config) is not None,
        }

    def redknot_prefill_totals(self) -> dict[str, Any]:
        """Aggregate prefill accounting since the last call, when running without the
        connector (benchmarks): tokens, FLOPs dense/RedKnot, kept FFN fraction."""
        from redknot_vllm.runtime import find_runtime

        rt = find_runtime(self.vllm_config)  # type: ignore[attr-defined]
        return {} if rt is None else rt.take_totals().as_dict()

    def redknot_reuse_tiers(self, gpu_bytes: int, host_bytes: int) -> dict[str, Any]:
        """Benchmarks: reopen the reuse store with other memory-tier limits (every segment
        stays on disk); returns the old store's stats."""
        from redknot_vllm.kv_store import SegmentStore
        from redknot_vllm.runtime import find_runtime

        rt = find_runtime(self.vllm_config)  # type: ignore[attr-defined]
        if rt is None or rt.reuse is None:
            return {}
        eng = rt.reuse.engine
        old = eng.store
        stats = old.stats()
        eng.store = SegmentStore(gpu_bytes=gpu_bytes, host_bytes=host_bytes,
                                 disk_dir=old._dir, disk_bytes=eng.cfg.disk_bytes,
                                 device=eng.device)
        del old
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return stats

    def redknot_request_stats(self, request_ids: list[str] | None) -> dict[str, dict[str, Any]]:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if not has_kv_transfer_group():
            return {}
        conn = get_kv_transfer_group()
        if not isinstance(conn, RedknotConnector):
            return {}
        if request_ids is None:
            return dict(conn.results)
        return {rid: conn.results[key] for rid in request_ids
                for key in (rid, *conn.suffixed.get(rid, ())) if key in conn.results}


def request_stats(llm: Any, request_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per-request RedKnot prefill stats from the engine's workers (rank 0's view).

    Args:
        llm: a ``vllm.LLM`` built with :func:`redknot_vllm.engine_args`.
        request_ids: ``RequestOutput.request_id`` values; None returns all kept results.

    Returns:
        request id -> {prompt_tokens, cached_tokens, prefill_tokens, flops_dense,
        flops_redknot, flops_saved, ffn_kept_fraction}. Requests still in prefill, or run
        without the RedKnot connector, are absent.
    """
    per_worker = llm.collective_rpc("redknot_request_stats", args=(request_ids,))
    return per_worker[0] if per_worker else {}
