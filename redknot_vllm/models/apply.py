"""Install RedKnot into a finished vLLM decoder model (the model classes only call this).

For every decoder layer on this pipeline stage:

* its ``Attention`` is rebuilt with the RedKnot backend, the layer's head-class plan and
  the engine's runtime;
* its MLP becomes token-sparse (:func:`redknot_vllm.sparse_ffn.make_sparse`) when the
  sparse-FFN schedule makes that layer sparse.

Works for any model whose layers have ``self_attn.attn`` and ``mlp`` (Llama, Mistral,
Qwen2, Qwen3). Weights, parameter names and the decoder forward are untouched; with KV
reuse the forward runs over the tokens the step state says are computed.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.logger import init_logger

from redknot_vllm import compat
from redknot_vllm.attention.backend import RedKnotAttentionBackend
from redknot_vllm.attention.plan import LayerPlan, build_layer_plan, permute_attention_heads
from redknot_vllm.config import RedKnotConfig, RedKnotConfigError
from redknot_vllm.dims import ModelDims
from redknot_vllm.runtime import RUNTIME_KEY, RedKnotRuntime
from redknot_vllm.sparse_ffn import make_sparse

logger = init_logger(__name__)


def apply_redknot(causal_lm: torch.nn.Module, vllm_config: Any) -> RedKnotRuntime | None:
    """Switch RedKnot on for ``causal_lm`` per ``additional_config["redknot"]``.

    Returns the runtime, or None when no head config is given (the model then runs exactly
    as stock vLLM, which is logged once).
    """
    arch = type(causal_lm).__name__
    cfg = RedKnotConfig.from_additional_config(vllm_config.additional_config)
    if cfg is None or cfg.head_config is None:
        logger.info_once(
            "%s: no RedKnot head config (additional_config['redknot']['head_config']); "
            "running dense, identical to stock vLLM", arch)
        return None
    dims = ModelDims.from_hf_config(vllm_config.model_config.hf_text_config)
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    tp_rank = get_tensor_model_parallel_rank()
    hc = cfg.head_config
    hc.validate_for_model(dims.num_layers, dims.num_kv_heads, tp_size, dims.max_positions)
    if cfg.sparse_ffn is not None:
        cfg.sparse_ffn.validate_for_model(dims.num_layers, dims.max_positions)
    if cfg.reuse is not None and cfg.reuse.blend_layers >= dims.num_layers:
        raise RedKnotConfigError(
            f"reuse.blend_layers is {cfg.reuse.blend_layers}; this model has "
            f"{dims.num_layers} layers: use fewer (the blend choice needs layers after it)")
    if cfg.require_gate:
        from redknot_vllm.gate import require_passed

        passed = require_passed(vllm_config.model_config.model, cfg,
                                vllm_config.model_config.dtype)
        logger.info_once("RedKnot quality gate found: %s", passed.message())
    runtime = RedKnotRuntime(cfg, dims, tp_rank)
    ctx = vllm_config.compilation_config.static_forward_context
    ctx[RUNTIME_KEY] = runtime

    model = causal_lm.model
    layers: list[tuple[int, str]] = []
    split = None
    if cfg.segpaged:
        from redknot_vllm.segpaged.split import split_kv_heads

        split = split_kv_heads(hc, tp_rank, tp_size)
    for li in range(model.start_layer, model.end_layer):
        layer = model.layers[li]
        old = layer.self_attn.attn
        layers.append((li, old.layer_name))
        if split is not None:
            runtime.plans[li], layer.self_attn.attn = _segpaged_layer(old, hc, li, split,
                                                                     runtime, tp_rank, tp_size)
        else:
            plan = build_layer_plan(hc, li, tp_rank, tp_size)
            runtime.plans[li] = plan
            layer.self_attn.attn = compat.rebuild_attention(
                old, attn_backend=RedKnotAttentionBackend, redknot_plan=plan,
                redknot_runtime=runtime)
        sparse = cfg.sparse_ffn
        if sparse is not None and sparse.threshold(li) < 1.0:
            make_sparse(
                layer.mlp, layer=li,
                prefix=old.layer_name.removesuffix("self_attn.attn") + "mlp",
                runtime=runtime, threshold=sparse.threshold(li),
                recent_n=sparse.recent_n, min_keep=sparse.min_keep, tp_size=tp_size,
                static_forward_context=ctx, by_fraction=sparse.by_fraction)
    if cfg.reuse is not None:
        local = None
        if split is not None:  # SegPaged: each layer's local heads live in a layer of their own
            from redknot_vllm.segpaged.layers import LOCAL_SUFFIX

            local = ([name + LOCAL_SUFFIX for _, name in layers], split.kv_global)
        runtime.reuse = _reuse_worker(vllm_config, model, layers, local)
    _log_startup(arch, cfg, tp_rank)
    return runtime


def _segpaged_layer(old: Any, hc: Any, li: int, split: Any, runtime: RedKnotRuntime,
                    tp_rank: int, tp_size: int) -> tuple[LayerPlan, torch.nn.Module]:
    """One decoder layer as SegPaged's two attention layers; returns the whole layer's plan
    (its permutation regroups the weights) and the module standing in for ``attn``."""
    from redknot_vllm.segpaged.layers import (
        LOCAL_SUFFIX,
        RedKnotLocalAttention,
        SegPagedAttention,
    )
    from redknot_vllm.segpaged.split import split_layer_plan

    plan, global_plan, local_plan = split_layer_plan(hc, li, split, tp_rank, tp_size)
    kg, kl = split.kv_global, split.kv_local
    per = old.num_heads // old.num_kv_heads
    global_attn = compat.rebuild_attention(
        old, attn_backend=RedKnotAttentionBackend, redknot_plan=global_plan,
        redknot_runtime=runtime, num_heads=kg * per, num_kv_heads=kg)
    local_attn = compat.rebuild_attention(
        old, cls=RedKnotLocalAttention, attn_backend=RedKnotAttentionBackend,
        redknot_plan=local_plan, redknot_runtime=runtime, redknot_local=True,
        num_heads=kl * per, num_kv_heads=kl, prefix=old.layer_name + LOCAL_SUFFIX,
        redknot_window=split.window, redknot_sink=split.sink)
    return plan, SegPagedAttention(global_attn, local_attn, kg, per, old.head_size)


def _reuse_worker(vllm_config: Any, model: torch.nn.Module, layers: list[tuple[int, str]],
                  local: tuple[list[str], int] | None = None) -> Any:
    from vllm.platforms import current_platform

    from redknot_vllm.reuse.keys import reuse_setup
    from redknot_vllm.reuse.worker import ReuseWorker

    setup = reuse_setup(vllm_config)
    assert setup is not None
    rotary = model.layers[model.start_layer].self_attn.rotary_emb
    device = torch.device("cuda") if current_platform.is_cuda() else None
    return ReuseWorker(setup, rotary, layers, device, local=local)


class RedKnotModelMixin:
    """Mixed in front of a stock ``*ForCausalLM``: installs RedKnot after construction and
    regroups attention heads after the weights are loaded."""

    redknot_runtime: RedKnotRuntime | None

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        self.redknot_runtime = apply_redknot(self, vllm_config)  # type: ignore[arg-type]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """The stock forward; with KV reuse, over the tokens that are not spliced only."""
        rt = self.redknot_runtime
        kept = None if rt is None else rt.compute_index()
        try:
            step = None if rt is None else rt.step
            if step is not None and step.blend is not None:
                assert rt is not None
                return self._blend_forward(rt, step, input_ids, positions,
                                           intermediate_tensors, inputs_embeds, **kwargs)
            if kept is None:
                return super().forward(input_ids, positions,  # type: ignore[misc]
                                       intermediate_tensors, inputs_embeds, **kwargs)
            h = super().forward(  # type: ignore[misc]
                None if input_ids is None else input_ids[kept], positions[..., kept],
                intermediate_tensors, None if inputs_embeds is None else inputs_embeds[kept],
                **kwargs)
            # dropped rows' hidden states are never read: only the last prompt token of a
            # request is sampled, and it is always computed
            out = h.new_zeros((positions.shape[-1], *h.shape[1:]))
            out[kept] = h
            return out
        finally:
            if rt is not None:
                rt.end_forward()

    def _blend_forward(self, rt: RedKnotRuntime, step: Any, input_ids: torch.Tensor | None,
                       positions: torch.Tensor, intermediate_tensors: Any,
                       inputs_embeds: torch.Tensor | None, **kwargs: Any) -> Any:
        """``recompute_select="blend"``: the decoder's own layers, the first
        ``step.blend.layers`` over every token, the rest over the tokens the reuse worker
        keeps once it has compared their fresh KV with the spliced KV
        (:mod:`redknot_vllm.reuse.blend`). Eager: this step bypasses the compiled graph."""
        model = self.model  # type: ignore[attr-defined]
        if (intermediate_tensors is not None or model.start_layer != 0 or kwargs
                or getattr(model, "aux_hidden_state_layers", None) or rt.reuse is None):
            logger.warning_once("RedKnot reuse: recompute_select 'blend' runs on one pipeline "
                                "stage without auxiliary hidden states only; this step "
                                "computes every token")
            step.blend = None
            return super().forward(input_ids, positions,  # type: ignore[misc]
                                   intermediate_tensors, inputs_embeds, **kwargs)
        n = positions.shape[-1]
        h = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        residual = None
        layers = model.layers[model.start_layer:model.end_layer]
        first = step.blend.layers
        for layer in layers[:first]:
            h, residual = layer(positions, h, residual)
        kept = rt.reuse.blend_restrict(step, compat.current_forward_context())
        if kept is not None:
            h, residual, positions = h[kept], residual[kept], positions[..., kept]
        for layer in layers[first:]:
            h, residual = layer(positions, h, residual)
        h, _ = model.norm(h, residual)
        if kept is None:
            return h
        out = h.new_zeros((n, *h.shape[1:]))
        out[kept] = h
        return out

    def load_weights(self, weights: Any) -> Any:
        loaded = super().load_weights(weights)  # type: ignore[misc]
        if self.redknot_runtime is not None:
            model = self.model  # type: ignore[attr-defined]
            for li, plan in self.redknot_runtime.plans.items():
                permute_attention_heads(model.layers[li].self_attn, plan)
        return loaded


def _log_startup(arch: str, cfg: RedKnotConfig, tp_rank: int) -> None:
    if tp_rank != 0:
        return
    hc = cfg.head_config
    assert hc is not None
    notes = []
    if hc.defaults_applied:
        notes.append(f"defaults applied: {', '.join(hc.defaults_applied)}")
    if hc.counts()["retrieval"] and hc.retrieval_blocks is None:
        notes.append("retrieval heads run as global (no retrieval_blocks; the seed's top-p "
                     "is not implemented)")
    sf = cfg.sparse_ffn
    sparse = ("off" if sf is None else
              f"dense_until={sf.dense_until}, mass_thresh={sf.mass_thresh}, "
              f"keep_fraction={sf.keep_fraction}, "
              f"deep_layer_start={sf.deep_layer_start}, mass_thresh_deep={sf.mass_thresh_deep},"
              f" recent_n={sf.recent_n}, min_keep={sf.min_keep}")
    logger.info("RedKnot on for %s (head config %s, sha256 %s): %s; sparse FFN: %s; decode: "
                "full attention%s", arch, hc.source, hc.content_hash()[:12], hc.summary(),
                sparse, "; " + "; ".join(notes) if notes else "")
