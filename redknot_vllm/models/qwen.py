"""RedKnot Qwen2 and Qwen3: the stock classes with :class:`RedknotModelMixin` in front."""

from __future__ import annotations

from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from redknot_vllm.models.apply import RedknotModelMixin


class RedknotQwen2ForCausalLM(RedknotModelMixin, Qwen2ForCausalLM):
    pass


class RedknotQwen3ForCausalLM(RedknotModelMixin, Qwen3ForCausalLM):
    pass
