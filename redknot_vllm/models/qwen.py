"""RedKnot Qwen2 and Qwen3: the stock classes plus :func:`apply_redknot`."""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from redknot_vllm.models.apply import apply_redknot


class RedknotQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        apply_redknot(self, vllm_config)


class RedknotQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        apply_redknot(self, vllm_config)
