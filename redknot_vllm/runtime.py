"""Per-engine RedKnot state in a worker: the configuration, and the steps to account.

One :class:`RedknotRuntime` is created per model instance (so per worker, never per
process) and registered in vLLM's ``static_forward_context`` under :data:`RUNTIME_KEY`, where
the attention builder and the connector find it through their ``vllm_config``.

Accounting: every step with prefill rows hands its metadata to :meth:`begin_step`; after
the forward the kept FFN counts are in it. With the RedKnot connector, the connector drains
the steps in the same step and attributes rows to request ids (exact per-request stats).
Without it, steps are folded into an aggregate logged every few seconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from redknot_vllm import envs
from redknot_vllm.config import RedKnotConfig
from redknot_vllm.flops import AttentionShape, ModelDims, PrefillFlops

if TYPE_CHECKING:
    from redknot_vllm.attention.backend import RedKnotAttentionMetadata
    from redknot_vllm.attention.plan import LayerPlan

logger = init_logger(__name__)

RUNTIME_KEY = "redknot.runtime"


class RedknotRuntime:
    """Configuration and accounting of one RedKnot model instance."""

    def __init__(self, config: RedKnotConfig, dims: ModelDims, tp_rank: int) -> None:
        assert config.head_config is not None
        self.config = config
        self.dims = dims
        self.tp_rank = tp_rank
        self.sparse_ffn = config.sparse_ffn
        self.attention_shape = AttentionShape.from_head_config(dims, config.head_config)
        sf = config.sparse_ffn
        self.sparse_layers = frozenset(
            li for li in range(dims.num_layers) if sf is not None and sf.threshold(li) < 1.0)
        self.plans: dict[int, LayerPlan] = {}
        """Layer index -> plan, for the layers on this pipeline stage."""
        self.reuse: Any = None
        """:class:`redknot_vllm.reuse.ReuseWorker` when offline KV reuse is on."""
        self.per_request = False
        """Set by the RedKnot connector: it drains the steps itself, by request id."""
        self._pending: list[RedKnotAttentionMetadata] = []
        self.totals = PrefillFlops()
        """All prefill rows folded here since the last :meth:`take_totals` (no connector)."""
        self._window = PrefillFlops()
        self._window_start = time.monotonic()

    # ---------------------------------------------------------------- steps
    def begin_step(self, md: RedKnotAttentionMetadata) -> None:
        """Called by the builder for every step that has prefill rows."""
        if not self.per_request:
            self._fold_into_window()
        self._pending.append(md)

    def replace_step(self, old: RedKnotAttentionMetadata, new: RedKnotAttentionMetadata) -> None:
        """KV reuse restricted a pending step's rows: account the rows that really run."""
        for i, md in enumerate(self._pending):
            if md is old:
                self._pending[i] = new

    def drain(self) -> list[RedKnotAttentionMetadata]:
        """Steps whose forward has run, oldest first."""
        out, self._pending = self._pending, []
        return out

    def row_flops(self, md: RedKnotAttentionMetadata, row: int,
                  kept_host: dict[int, list[int]]) -> PrefillFlops:
        """FLOPs of one prefill row of a finished step; ``kept_host`` is
        ``md.ffn_kept_host()`` (one transfer per step, shared by its rows)."""
        q_len = md.query_start_loc[row + 1] - md.query_start_loc[row]
        end = md.seq_lens[row]
        per_layer = {li: kept_host[li][row] if li in kept_host else q_len
                     for li in range(self.dims.num_layers)}
        sparse_kept = sum(per_layer[li] for li in self.sparse_layers)
        acc = PrefillFlops()
        acc.add_chunk(self.dims, self.attention_shape, end - q_len, end,
                      sum(per_layer.values()), (q_len * len(self.sparse_layers), sparse_kept))
        return acc

    # ------------------------------------------------------------ aggregate
    def take_totals(self) -> PrefillFlops:
        """Prefill accounting of every finished step since the last call (no connector)."""
        self._fold_into_window()
        out, self.totals = self.totals, PrefillFlops()
        return out

    def _fold_into_window(self) -> None:
        for md in self.drain():
            kept = md.ffn_kept_host()
            for row, prefill in enumerate(md.is_prefill):
                if prefill:
                    acc = self.row_flops(md, row, kept)
                    self._window.merge(acc)
                    self.totals.merge(acc)
        now = time.monotonic()
        if self._window.tokens and now - self._window_start >= envs.stats_log_interval_s():
            if self.tp_rank == 0:
                logger.info(
                    "RedKnot prefill (last %.0f s, all requests): %d tokens, FFN kept %.1f%%, "
                    "prefill FLOPs saved %.1f%% (per-request stats need the RedKnot connector:"
                    " --kv-transfer-config %s)", now - self._window_start,
                    self._window.tokens, 100 * self._window.ffn_kept_fraction,
                    100 * self._window.saved_fraction, _connector_json())
            self._window = PrefillFlops()
            self._window_start = now


def _connector_json() -> str:
    import json

    from redknot_vllm.config import connector_config

    return json.dumps(connector_config())


def find_runtime(vllm_config: Any) -> RedknotRuntime | None:
    """The RedKnot runtime of the model built with ``vllm_config``, if any."""
    rt = vllm_config.compilation_config.static_forward_context.get(RUNTIME_KEY)
    return rt if isinstance(rt, RedknotRuntime) else None
