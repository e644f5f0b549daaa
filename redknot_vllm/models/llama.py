"""RedKnot Llama and Mistral: the stock classes plus :func:`apply_redknot`."""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM

from redknot_vllm.models.apply import apply_redknot


class RedknotLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        apply_redknot(self, vllm_config)


class RedknotMistralForCausalLM(MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        apply_redknot(self, vllm_config)
