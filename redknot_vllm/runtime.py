"""Per-engine RedKnot state in a worker: the configuration, the plans and the steps.

One :class:`RedKnotRuntime` is created per model instance (so per worker, never per
process) and registered in vLLM's ``static_forward_context`` under :data:`RUNTIME_KEY`,
where the attention builder, the connector and the worker extension find it through their
``vllm_config``. It owns the current step's state (:mod:`redknot_vllm.step`, which says
who writes and reads each field) and the finished steps until accounting takes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redknot_vllm.accounting import FlopsModel, RequestAccounting, WindowTotals
from redknot_vllm.config import RedKnotConfig
from redknot_vllm.dims import ModelDims
from redknot_vllm.flops import PrefillFlops
from redknot_vllm.step import StepState

if TYPE_CHECKING:
    import torch

    from redknot_vllm.attention.metadata import RedKnotAttentionMetadata
    from redknot_vllm.attention.plan import LayerPlan
    from redknot_vllm.reuse.worker import ReuseWorker

RUNTIME_KEY = "redknot.runtime"


class RedKnotRuntime:
    """Configuration, plans and per-step state of one RedKnot model instance."""

    def __init__(self, config: RedKnotConfig, dims: ModelDims, tp_rank: int) -> None:
        assert config.head_config is not None
        self.config = config
        self.dims = dims
        self.tp_rank = tp_rank
        self.sparse_ffn = config.sparse_ffn
        self.flops = FlopsModel(config, dims)
        self.plans: dict[int, LayerPlan] = {}
        """Layer index -> plan, for the layers on this pipeline stage."""
        self.reuse: ReuseWorker | None = None
        """The worker half of offline KV reuse, when it is on."""
        self.requests: RequestAccounting | None = None
        """Per-request accounting; set by the RedKnot connector, which feeds it."""
        self.step: StepState | None = None
        """The step whose forward is being prepared or running; None between forwards and
        for steps without prefill rows."""
        self._pending: list[StepState] = []
        self._totals = WindowTotals(self.flops, tp_rank)

    # ---------------------------------------------------------------- steps
    def begin_step(self, md: RedKnotAttentionMetadata) -> None:
        """Called by the attention builder once per step it plans."""
        if not md.has_prefill:
            self.step = None
            return
        if self.requests is None:
            self._totals.fold(self.drain())
        self.step = StepState(md, want_importance=self.sparse_ffn is not None)
        self._pending.append(self.step)

    def compute_index(self) -> torch.Tensor | None:
        """Token indices the model runs this step (KV reuse); None: every token."""
        return None if self.step is None else self.step.compute_index

    def end_forward(self) -> None:
        """The model's forward returned: no step is current (accounting still has it)."""
        self.step = None

    def drain(self) -> list[StepState]:
        """Steps planned since the last drain, oldest first."""
        out, self._pending = self._pending, []
        return out

    def enable_request_accounting(self) -> RequestAccounting:
        """Switch to per-request accounting (the connector drains the steps itself)."""
        if self.requests is None:
            self.requests = RequestAccounting(self.flops, self.tp_rank)
        return self.requests

    def take_totals(self) -> PrefillFlops:
        """Prefill accounting of every finished step since the last call (no connector)."""
        self._totals.fold(self.drain())
        return self._totals.take()


def find_runtime(vllm_config: Any) -> RedKnotRuntime | None:
    """The RedKnot runtime of the model built with ``vllm_config``, if any."""
    rt = vllm_config.compilation_config.static_forward_context.get(RUNTIME_KEY)
    return rt if isinstance(rt, RedKnotRuntime) else None
