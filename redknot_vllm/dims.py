"""Model dimensions, read one way from an HF config (object or ``config.json`` dict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelDims:
    """Whole-model shapes (before tensor parallelism)."""

    num_layers: int
    hidden: int
    intermediate: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None = None
    """``max_position_embeddings``, when the config has it."""

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelDims:
        """From a transformers ``PretrainedConfig`` or a parsed ``config.json`` dict.

        Multimodal configs carry the language model under ``text_config``; that is the one
        read. ``num_key_value_heads`` defaults to the query heads (no GQA) and ``head_dim``
        to ``hidden_size // num_attention_heads``, as transformers does.
        """
        if isinstance(cfg, dict):
            d = cfg.get("text_config") or cfg
            get = d.get
        else:
            obj = getattr(cfg, "text_config", None) or cfg

            def get(name: str) -> Any:
                return getattr(obj, name, None)
        try:
            heads = int(get("num_attention_heads"))
            hidden = int(get("hidden_size"))
            return cls(
                num_layers=int(get("num_hidden_layers")),
                hidden=hidden,
                intermediate=int(get("intermediate_size")),
                num_q_heads=heads,
                num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                max_positions=int(get("max_position_embeddings") or 0) or None,
            )
        except (TypeError, ValueError):
            raise ValueError("the model config lacks a decoder dimension; RedKnot reads "
                             "num_hidden_layers, hidden_size, intermediate_size and "
                             "num_attention_heads") from None

    @property
    def projection_per_token(self) -> int:
        """QKV and O projection FLOPs of one token in one layer."""
        h, d = self.hidden, self.head_dim
        return 2 * h * (self.num_q_heads + 2 * self.num_kv_heads) * d + 2 * self.num_q_heads * d * h

    @property
    def ffn_per_token(self) -> int:
        """SwiGLU FLOPs of one token in one layer."""
        return 6 * self.hidden * self.intermediate

    def layout(self, dtype: str, tp: int = 1) -> str:
        """The KV layout string segments are keyed by (layers, KV heads, head size, dtype)."""
        return f"L{self.num_layers}xH{self.num_kv_heads}xD{self.head_dim}|{dtype}|tp{tp}"
