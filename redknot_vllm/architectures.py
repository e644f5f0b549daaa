"""The one architecture table: stock vLLM architecture -> the RedKnot override.

Read by the plugin (which registers the overrides by lazy ``module:Class`` strings) and by
:func:`redknot_vllm.engine_args` (which selects one through ``hf_overrides``). Importing it
is free: no torch, no vLLM.
"""

from __future__ import annotations

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("RedKnotLlamaForCausalLM", "redknot_vllm.models.llama"),
    "MistralForCausalLM": ("RedKnotMistralForCausalLM", "redknot_vllm.models.llama"),
    "Qwen2ForCausalLM": ("RedKnotQwen2ForCausalLM", "redknot_vllm.models.qwen"),
    "Qwen3ForCausalLM": ("RedKnotQwen3ForCausalLM", "redknot_vllm.models.qwen"),
}
"""Stock architecture -> (RedKnot architecture name, module that defines it)."""


def override_classes() -> dict[str, str]:
    """RedKnot architecture name -> ``module:Class``, for vLLM's ``ModelRegistry``."""
    return {name: f"{module}:{name}" for name, module in ARCHITECTURES.values()}


def redknot_names() -> frozenset[str]:
    """The RedKnot architecture names."""
    return frozenset(name for name, _ in ARCHITECTURES.values())
