"""The RedKnot KV connector: a thin facade over per-request accounting and offline KV reuse.

Selected with ``--kv-transfer-config '{"kv_connector": "RedKnotConnector",
"kv_connector_module_path": "redknot_vllm.connector", "kv_role": "kv_both"}'`` (what
:func:`redknot_vllm.engine_args` and ``redknot serve`` add).

Hook contracts, in base-class order:

* Scheduler side (engine core). ``get_num_new_matched_tokens`` claims no external tokens
  (reused segments sit mid-prompt, where vLLM has no "computed" state); with reuse on it
  plans the request's stored segments once and salts its block hashes
  (:class:`redknot_vllm.reuse.scheduler.ReuseScheduler`). ``build_connector_meta`` tracks
  each request's blocks (:class:`redknot_vllm.tracker.RequestTracker`) and sends, for
  requests still in their prompt, ``first slot of the step's tokens -> (request id, prompt
  length, tokens computed before)``, the segments inside the step and the prompts whose KV
  is stored or probed after it (and, for SegPaged, every step of those prompts); a step
  with segments asks for ``start_load_kv`` before the forward.
* Worker side. ``register_kv_caches`` hands the caches to the reuse worker and switches the
  runtime to per-request accounting. ``start_load_kv`` (before the forward) has the reuse
  worker splice the step's segments and restrict the step to the tokens still computed;
  ``wait_for_save`` (after it) has it store or probe finished prompts, then attributes the
  runtime's finished steps to requests (:class:`redknot_vllm.accounting.RequestAccounting`).
  ``get_finished`` forgets finished requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.logger import init_logger

from redknot_vllm import compat
from redknot_vllm.config import IPC_ONE_PROCESS, RedKnotConfigError
from redknot_vllm.pd import LoadSpec, PDScheduler, PDWorker, SaveSpec, layout_of, pd_config
from redknot_vllm.reuse.keys import reuse_setup
from redknot_vllm.reuse.params import Capture, Use
from redknot_vllm.reuse.scheduler import ReuseScheduler
from redknot_vllm.runtime import RedKnotRuntime, find_runtime
from redknot_vllm.tracker import RequestTracker

if TYPE_CHECKING:
    import torch

logger = init_logger(__name__)


@dataclass
class RedKnotConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, per step."""

    by_first_slot: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    """slot of a request's first token this step -> (request id, prompt length,
    tokens already computed before its first step, e.g. prefix-cache hits)."""
    reuse: dict[int, tuple[str, int, list[Use]]] = field(default_factory=dict)
    """KV reuse: first slot -> (request id, prompt length, stored segments in this step)."""
    capture: dict[int, Capture] = field(default_factory=dict)
    """KV reuse: first slot -> a prompt finishing this step whose KV is stored or probed."""
    gathering: dict[int, tuple[str, int]] = field(default_factory=dict)
    """KV reuse: first slot -> (request id, prompt length) of every prompt in this step
    that will be stored or probed (SegPaged gathers its local heads' KV step by step)."""
    pd_load: list[LoadSpec] = field(default_factory=list)
    """PD consumer: transfers loaded into their requests' pages before this step's forward."""
    pd_save: dict[int, SaveSpec] = field(default_factory=dict)
    """PD producer: first slot -> a prompt completing this step whose KV is written."""


class RedKnotConnector(KVConnectorBase_V1, SupportsHMA):
    """See the module docstring."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole,
                 kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        # slots are counted in the first KV-cache group's blocks (the one whose metadata
        # opens a step); with SegPaged's two groups vLLM may have scaled that group's block
        # size away from cache_config.block_size to unify page sizes
        groups = getattr(kv_cache_config, "kv_cache_groups", None)
        block_size = (groups[0].kv_cache_spec.block_size if groups
                      else vllm_config.cache_config.block_size)
        self._tracker = RequestTracker(block_size)
        self._reuse: ReuseScheduler | None = None
        if role == KVConnectorRole.SCHEDULER:
            setup = reuse_setup(vllm_config)
            if setup is not None:
                self._reuse = ReuseScheduler(setup, block_size)
        self._runtime: RedKnotRuntime | None = None
        pd = pd_config(vllm_config)
        self._pd: PDScheduler | None = None
        self._pd_worker: PDWorker | None = None
        if pd is not None:
            if pd.transport == "cuda_ipc" and vllm_config.parallel_config.world_size > 1:
                raise RedKnotConfigError(IPC_ONE_PROCESS)
            layout = layout_of(vllm_config)
            if role == KVConnectorRole.SCHEDULER:
                self._pd = PDScheduler(pd, layout)
            else:
                local = [g.kv_cache_spec for g in groups or ()
                         if hasattr(g.kv_cache_spec, "num_sink_tokens")]
                self._pd_worker = PDWorker(
                    pd, layout, window=local[0].sliding_window if local else None,
                    sink=local[0].num_sink_tokens if local else 0)

    # ------------------------------------------------------------ Scheduler-side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        if self._reuse is not None:
            self._reuse.plan(request, num_computed_tokens)
        if self._pd is not None:
            try:
                return self._pd.matched(request, num_computed_tokens)
            except Exception as e:  # a request's transfer never takes the engine down
                logger.error("RedKnot PD: planning request %s failed (%s: %s); its prompt is "
                             "computed", request.request_id, type(e).__name__, e)
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any,
                                 num_external_tokens: int) -> None:
        if self._pd is not None:
            self._pd.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = RedKnotConnectorMetadata()
        if self._pd is not None:
            meta.pd_load = self._pd.loads([r.req_id for r in
                                           scheduler_output.scheduled_new_reqs])
        for req in compat.scheduled_requests(scheduler_output):
            p = self._tracker.update(req)
            if p is None:
                continue
            meta.by_first_slot[p.first_slot] = (p.req_id, p.prompt_len, p.num_cached)
            if self._pd is not None and p.end >= p.prompt_len:
                save = self._pd.save(p.req_id, p.prompt_len)
                if save is not None:
                    meta.pd_save[p.first_slot] = save
            if self._reuse is None:
                continue
            uses = self._reuse.uses_in(p.req_id, p.start, p.end)
            if uses:
                meta.reuse[p.first_slot] = (p.req_id, p.prompt_len, uses)
            if self._reuse.capturing(p.req_id):
                meta.gathering[p.first_slot] = (p.req_id, p.prompt_len)
            cap = self._reuse.capture(p.req_id, p.end, p.prompt_len, p.block_ids)
            if cap is not None:
                meta.capture[p.first_slot] = cap
        if meta.reuse or meta.pd_load:
            compat.require_sync_kv_load(scheduler_output)  # splice / load before the forward
        return meta

    def request_finished(self, request: Any, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        self._tracker.forget(request.request_id)
        if self._reuse is not None:
            self._reuse.forget(request.request_id)
        # the transfer was written at the step that completed the prompt: no blocks held
        return False, None if self._pd is None else self._pd.finished(request.request_id)

    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    # --------------------------------------------------------------- Worker-side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._pd_worker is not None:
            self._pd_worker.register(kv_caches)
        self._runtime = find_runtime(self._vllm_config)
        if self._runtime is None:
            return
        self._runtime.enable_request_accounting()
        if self._runtime.reuse is not None:
            self._runtime.reuse.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._pd_worker is not None and self.has_connector_metadata() and \
                self._meta().pd_load:
            self._pd_worker.load(self._meta().pd_load)
        rt = self._runtime
        if rt is None or rt.reuse is None or not self.has_connector_metadata():
            return
        meta = self._meta()
        if meta.reuse:
            rt.reuse.splice(rt.step, meta.reuse, forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        if self._pd_worker is not None and self.has_connector_metadata() and \
                self._meta().pd_save:
            self._pd_worker.save(self._meta().pd_save, compat.current_forward_context())
        rt = self._runtime
        if rt is None or rt.requests is None or not self.has_connector_metadata():
            return
        meta = self._meta()
        if rt.reuse is not None:  # every step: it also drops this step's splice state
            rt.reuse.after_step(meta.gathering, meta.capture.values())
        steps = rt.drain()
        try:
            rt.requests.on_steps(steps, meta.by_first_slot)
        except Exception as e:  # accounting must never take the engine down
            logger.error("RedKnot accounting of a step failed (%s: %s); its requests' stats are "
                         "incomplete", type(e).__name__, e, exc_info=True)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                set[str] | None]:
        if self._pd_worker is not None:  # every step: free acknowledged cuda_ipc buffers
            self._pd_worker.reap()
        if self._runtime is not None:
            if self._runtime.requests is not None:
                self._runtime.requests.forget(finished_req_ids)
            if self._runtime.reuse is not None:
                self._runtime.reuse.forget(finished_req_ids)
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self._pd_worker is None else self._pd_worker.load_errors()

    def _meta(self) -> RedKnotConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RedKnotConnectorMetadata), type(meta)
        return meta
