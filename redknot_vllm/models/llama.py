"""RedKnot Llama and Mistral: the stock classes with :class:`RedknotModelMixin` in front."""

from __future__ import annotations

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM

from redknot_vllm.models.apply import RedknotModelMixin


class RedknotLlamaForCausalLM(RedknotModelMixin, LlamaForCausalLM):
    pass


class RedknotMistralForCausalLM(RedknotModelMixin, MistralForCausalLM):
    pass
