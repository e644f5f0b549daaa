"""SegPaged step 1: ``SinkSlidingWindowSpec`` / ``SinkSlidingWindowManager`` driven with a
real vLLM ``BlockPool`` (CPU, no model). Expected block sets are derived from token
positions, not from the manager's own formulas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1 import kv_cache_spec_registry
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    SlidingWindowManager,
    get_manager_for_kv_cache_spec,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from redknot_vllm.segpaged.spec import SinkSlidingWindowManager, SinkSlidingWindowSpec, register

BS, W, S = 4, 10, 6  # block size, window, sinks: 2 sink blocks, cdiv(W - 1, BS) = 3
NUM_BLOCKS = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _spec(**kw) -> SinkSlidingWindowSpec:
    args = dict(block_size=BS, num_kv_heads=2, head_size=8, dtype=torch.float16,
                sliding_window=W, num_sink_tokens=S)
    return SinkSlidingWindowSpec(**{**args, **kw})


def _manager(spec: SinkSlidingWindowSpec | None = None, caching: bool = True,
             cls: type = SinkSlidingWindowManager):
    spec = spec or _spec()
    pool = BlockPool(num_gpu_blocks=NUM_BLOCKS, enable_caching=caching, hash_block_size=BS)
    # As vLLM's own tests: a cap large enough to be a no-op.
    mgr = cls(spec, block_pool=pool, enable_caching=caching, kv_cache_group_id=0,
              scheduler_block_size=BS, max_admission_blocks_per_request=10**9)
    return mgr, pool


def _expected_real(n: int) -> set[int]:
    """Blocks the next query (position ``n``) needs: those holding a sink token ``< S`` or
    one of the ``W - 1`` tokens before it."""
    needed = {t // BS for t in range(min(S, n))}
    return needed | {t // BS for t in range(max(0, n - W + 1), n)}


def _real(blocks) -> set[int]:
    return {i for i, b in enumerate(blocks) if not b.is_null}


def _cache(pool: BlockPool, num: int, cached: set[int]) -> list[BlockHash]:
    """Hashes for ``num`` blocks; those in ``cached`` are in the pool's prefix cache, each
    backed by a distinct free (evictable) block."""
    hashes = [BlockHash(f"h{i}".encode()) for i in range(num)]
    pool.cached_block_hash_to_block._cache.clear()
    for i in cached:
        pool.cached_block_hash_to_block.insert(make_block_hash_with_group_id(hashes[i], 0),
                                               pool.blocks[10 + i])
    return hashes


def _hit(mgr, pool, hashes, max_length):
    blocks, length = type(mgr).find_longest_cache_hit(
        block_hashes=hashes, max_length=max_length, kv_cache_group_ids=[0], block_pool=pool,
        kv_cache_spec=mgr.kv_cache_spec, drop_eagle_block=False, alignment_tokens=BS)
    return blocks[0], length


# --- spec -----------------------------------------------------------------------------


def test_spec_admission_and_memory_match_hand_computed_values():
    spec = _spec(block_size=16, sliding_window=1024, num_sink_tokens=64)
    cfg = SimpleNamespace(max_in_flight_tokens=2048,
                          model_config=SimpleNamespace(max_model_len=32768),
                          parallel_config=SimpleNamespace(decode_context_parallel_size=1))
    assert spec.sink_blocks() == 4
    # sinks + cdiv(W - 1 + in-flight, bs) + 1 = 4 + cdiv(3071, 16) + 1 = 4 + 192 + 1
    assert spec.max_admission_blocks_per_request(2048, 32768) == 197
    page = 2 * 16 * (8 + 8) * 2  # heads * tokens * (K + V dims) * fp16 bytes
    assert spec.page_size_bytes == page
    assert spec.max_memory_usage_bytes(cfg) == 197 * page
    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float16)
    assert full.max_memory_usage_bytes(cfg) == 2048 * page > spec.max_memory_usage_bytes(cfg)
    # one more than plain SWA per sink block
    swa = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=8,
                            dtype=torch.float16, sliding_window=1024)
    assert spec.max_memory_usage_bytes(cfg) == swa.max_memory_usage_bytes(cfg) + 4 * page
    # capped at a dense request's blocks
    assert _spec(block_size=16, sliding_window=32768).max_admission_blocks_per_request(
        2048, 32768) == 2048


def test_spec_uniformity_and_merge_need_equal_window_and_sinks():
    a = _spec()
    assert a.is_uniform_with_collection({"x": a, "y": _spec()})
    assert not a.is_uniform_with_collection({"x": a, "y": _spec(num_sink_tokens=S + 4)})
    assert not a.is_uniform_with_collection({"x": a, "y": _spec(sliding_window=W + 1)})
    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=8, dtype=torch.float16,
                            sliding_window=W)
    assert not a.is_uniform_with_collection({"x": a, "y": swa})
    assert SinkSlidingWindowSpec.merge([a, _spec()]) == a
    with pytest.raises(AssertionError):
        SinkSlidingWindowSpec.merge([a, _spec(num_sink_tokens=S + 4)])
    with pytest.raises(ValueError):
        _spec(num_sink_tokens=-1)


# --- manager: allocation and freeing --------------------------------------------------


@pytest.mark.parametrize("steps", [
    [7] * 9,                 # chunked prefill, chunks not block-aligned
    [13, 1, 1, 1, 30, 2],    # a chunk, decode, a long chunk
    [3, 3, 3] + [1] * 40,    # short prompt (n < S + W for a while), then decode
])
def test_request_holds_exactly_sinks_and_window(steps):
    mgr, pool = _manager()
    req, n = "r", 0
    free0 = pool.get_num_free_blocks()
    for chunk in steps:
        # allocate_slots' order: free on processed tokens, then allocate the chunk.
        mgr.remove_skipped_blocks(req, n)
        blocks = mgr.req_to_blocks[req]
        assert _real(blocks) == _expected_real(n), n
        assert all(blocks[i].is_null for i in set(range(len(blocks))) - _real(blocks))
        assert len(blocks) == _cdiv(n, BS)
        assert len(_real(blocks)) <= 2 + _cdiv(W - 1, BS) + 1  # sinks + window (+1)
        # freed blocks are back in the pool: it lacks exactly the real blocks held
        assert pool.get_num_free_blocks() == free0 - len(_real(blocks))
        mgr.allocate_new_blocks(req, n + chunk, n + chunk)
        n += chunk
    mgr.remove_skipped_blocks(req, n)
    blocks = mgr.req_to_blocks[req]
    assert n >= S + W and _real(blocks) == _expected_real(n)
    assert {0, 1} <= _real(blocks)  # the sink blocks survive to the end
    mgr.free(req)
    assert pool.get_num_free_blocks() == free0


def test_sinks_are_what_plain_swa_frees():
    sink, _ = _manager()
    swa, _ = _manager(cls=SlidingWindowManager)
    for mgr in (sink, swa):
        mgr.allocate_new_blocks("r", 40, 40)
        mgr.remove_skipped_blocks("r", 40)
    # window: tokens 31..39 -> blocks 7..9; sinks: tokens 0..5 -> blocks 0..1
    assert _real(sink.req_to_blocks["r"]) == {0, 1, 7, 8, 9}
    assert _real(swa.req_to_blocks["r"]) == {7, 8, 9}


# --- prefix-cache hits ----------------------------------------------------------------


def test_cache_hit_needs_sinks_and_window():
    mgr, pool = _manager()
    n = 10  # 40 tokens; a hit of 40 needs sinks {0, 1} and window {7, 8, 9}
    hashes = _cache(pool, n, {0, 1, 7, 8, 9})
    blocks, length = _hit(mgr, pool, hashes, n * BS)
    assert length == 40
    assert [b.block_id for b in blocks] == [10, 11, 0, 0, 0, 0, 0, 17, 18, 19]
    assert _real(blocks) == {0, 1, 7, 8, 9} and blocks[3].is_null

    # a missing sink block: only the cached prefix before it can hit
    hashes = _cache(pool, n, set(range(n)) - {1})
    blocks, length = _hit(mgr, pool, hashes, n * BS)
    assert length == BS and [b.block_id for b in blocks] == [10]
    _, swa_length = _hit(_manager(cls=SlidingWindowManager)[0], pool, hashes, n * BS)
    assert swa_length == 40  # plain SWA would have accepted it

    # a window block missing: the hit ends before it; the sinks still lead the list
    hashes = _cache(pool, n, {0, 1, 3, 4, 5, 8, 9})
    blocks, length = _hit(mgr, pool, hashes, n * BS)
    assert length == 6 * BS and [b.block_id for b in blocks] == [10, 11, 0, 13, 14, 15]


def test_new_request_with_hit_counts_and_holds_its_sinks():
    mgr, pool = _manager()
    swa, swa_pool = _manager(cls=SlidingWindowManager)
    hashes = _cache(pool, 10, {0, 1, 7, 8, 9})
    _cache(swa_pool, 10, {0, 1, 7, 8, 9})
    hit, length = _hit(mgr, pool, hashes, 40)
    swa_hit, _ = _hit(swa, swa_pool, hashes, 40)
    num_tokens = length + 9  # 9 new tokens -> blocks 10..12
    args = dict(num_tokens=num_tokens, total_computed_tokens=length,
                num_local_computed_tokens=length, num_tokens_main_model=num_tokens)
    want = mgr.get_num_blocks_to_allocate("r", new_computed_blocks=hit, **args)
    # 3 new blocks + the 5 evictable hit blocks touched (sinks and window)
    assert want == 3 + 5
    assert swa.get_num_blocks_to_allocate("r", new_computed_blocks=swa_hit, **args) == 3 + 3

    free0 = pool.get_num_free_blocks()
    mgr.add_local_computed_blocks("r", hit, length, 0)
    mgr.allocate_new_blocks("r", num_tokens, num_tokens)
    assert free0 - pool.get_num_free_blocks() == want  # the predictor matched the pool
    blocks = mgr.req_to_blocks["r"]
    assert [b.block_id for b in blocks[:10]] == [10, 11, 0, 0, 0, 0, 0, 17, 18, 19]
    assert _real(blocks) == {0, 1, 7, 8, 9, 10, 11, 12}
    assert all(b.ref_cnt == 1 for b in blocks if not b.is_null)
    # running now: the base fast path, sinks already held
    assert mgr.get_num_blocks_to_allocate("r", new_computed_blocks=[], **{
        **args, "num_tokens": num_tokens + BS}) == 1


def test_external_computed_tokens_keep_sink_positions_real():
    mgr, pool = _manager()
    ext, num_tokens = 40, 44  # 40 tokens from a KV connector, 4 new
    want = mgr.get_num_blocks_to_allocate(
        "r", num_tokens, [], total_computed_tokens=ext, num_local_computed_tokens=0,
        num_tokens_main_model=num_tokens)
    assert want == 2 + 3 + 1  # sinks, window, the new block
    free0 = pool.get_num_free_blocks()
    mgr.add_local_computed_blocks("r", [], 0, ext)
    mgr.allocate_external_computed_blocks("r", 0, ext)
    mgr.allocate_new_blocks("r", num_tokens, num_tokens)
    assert free0 - pool.get_num_free_blocks() == want
    assert _real(mgr.req_to_blocks["r"]) == {0, 1, 7, 8, 9, 10}

    # a local hit shorter than the sinks, the rest external
    mgr, pool = _manager()
    hashes = _cache(pool, 1, {0})
    hit, length = _hit(mgr, pool, hashes, BS)
    assert length == BS
    want = mgr.get_num_blocks_to_allocate(
        "r", num_tokens, hit, total_computed_tokens=length + ext - BS,
        num_local_computed_tokens=length, num_tokens_main_model=num_tokens)
    free0 = pool.get_num_free_blocks()
    mgr.add_local_computed_blocks("r", hit, length, ext - BS)
    mgr.allocate_external_computed_blocks("r", length, ext - BS)
    mgr.allocate_new_blocks("r", num_tokens, num_tokens)
    assert free0 - pool.get_num_free_blocks() == want == 1 + 1 + 3 + 1  # hit, sink, window, new
    blocks = mgr.req_to_blocks["r"]
    assert blocks[0].block_id == 10 and _real(blocks) == {0, 1, 7, 8, 9, 10}


def test_reachable_mask_keeps_sink_blocks():
    spec = _spec()
    kw = dict(start_block=0, end_block=16, alignment_tokens=8 * BS, use_eagle=False)
    base = SlidingWindowManager.reachable_block_mask(kv_cache_spec=spec, **kw)
    mask = SinkSlidingWindowManager.reachable_block_mask(kv_cache_spec=spec, **kw)
    assert base is not None and mask is not None
    # base: the 3 window blocks before each 8-block boundary; here also the 2 sinks
    assert {i for i, m in enumerate(base) if m} == {5, 6, 7, 13, 14, 15}
    assert {i for i, m in enumerate(mask) if m} == {0, 1, 5, 6, 7, 13, 14, 15}
    part = SinkSlidingWindowManager.reachable_block_mask(
        kv_cache_spec=spec, **{**kw, "start_block": 1})
    assert part is not None and part[0] and not part[1]  # offsets are relative to start


# --- registration ---------------------------------------------------------------------


def test_register_keeps_builtins_and_is_idempotent(monkeypatch):
    # A fresh process's registry: empty until the first lookup.
    monkeypatch.setattr(kv_cache_spec_registry, "_REGISTRY_KVCACHESPEC_LIST", {})
    monkeypatch.setattr(kv_cache_spec_registry, "_REGISTRY_ROLE_MANAGERS", {})
    full = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=8, dtype=torch.float16)
    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=8, dtype=torch.float16,
                            sliding_window=W)
    register()
    registered = dict(kv_cache_spec_registry._REGISTRY_KVCACHESPEC_LIST)
    register()
    assert kv_cache_spec_registry._REGISTRY_KVCACHESPEC_LIST == registered
    assert KVCacheSpecRegistry.get_manager_class(full) is FullAttentionManager
    assert KVCacheSpecRegistry.get_manager_class(swa) is SlidingWindowManager
    assert KVCacheSpecRegistry.get_manager_class(_spec()) is SinkSlidingWindowManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(_spec()) is SinkSlidingWindowSpec
    # vLLM's factory builds ours, with the sink-aware admission cap
    pool = BlockPool(num_gpu_blocks=NUM_BLOCKS, enable_caching=True, hash_block_size=BS)
    mgr = get_manager_for_kv_cache_spec(_spec(), max_in_flight_tokens=16, max_model_len=4096,
                                        block_pool=pool, enable_caching=True,
                                        kv_cache_group_id=1, scheduler_block_size=BS)
    assert type(mgr) is SinkSlidingWindowManager
    assert mgr.max_admission_blocks_per_request == 2 + _cdiv(W - 1 + 16, BS) + 1
