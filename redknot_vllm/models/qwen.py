"""RedKnot Qwen2 and Qwen3: the stock classes with :class:`RedKnotModelMixin` in front."""

from __future__ import annotations

from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from redknot_vllm.models.apply import RedKnotModelMixin


class RedKnotQwen2ForCausalLM(RedKnotModelMixin, Qwen2ForCausalLM):
    pass


class RedKnotQwen3ForCausalLM(RedKnotModelMixin, Qwen3ForCausalLM):
    pass
