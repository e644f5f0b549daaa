"""RedKnot Llama and Mistral: the stock classes with :class:`RedKnotModelMixin` in front."""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM

from redknot_vllm.models.apply import RedKnotModelMixin


class RedKnotLlamaForCausalLM(RedKnotModelMixin, LlamaForCausalLM):
    pass


class RedKnotMistralForCausalLM(RedKnotModelMixin, MistralForCausalLM):
    pass
