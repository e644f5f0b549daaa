"""The probe attention function: eager causal attention that shows its probabilities.

An :class:`AttentionProbe` is registered with transformers' ``AttentionInterface`` under
:data:`PROBE_NAME` (a process-wide registry; registering again replaces the callable) and
owns everything a profiling pass needs: the handler of the pass in flight and the scratch
buffers the ``[B, H, T, T]`` maps are computed into.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PROBE_NAME = "redknot_probe"

Handler = Callable[[int, torch.Tensor], None]
"""``handler(layer index, probabilities)`` of one pass."""


class AttentionProbe:
    """Eager causal attention that hands each layer's probabilities to the active handler."""

    def __init__(self) -> None:
        self._handler: Handler | None = None
        self._rows: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._device = torch.device("cpu")

    def buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A scratch tensor reused across layers and passes.

        Maps are hundreds of MB; allocating them afresh per layer costs more in page faults
        (fresh mmap'd memory is zeroed by the kernel) than the arithmetic on them.
        """
        if self._handler is None:  # not profiling: nothing would free the buffer later
            return torch.empty(shape, device=self._device)
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != self._device:
            buf = self._buffers[name] = torch.empty(numel, device=self._device)
        return buf[:numel].view(shape)

    def release(self) -> None:
        """Free the scratch buffers (after a profiling run)."""
        self._buffers.clear()

    def run(self, model: Any, ids: torch.Tensor, handler: Handler,
            rows: torch.Tensor | None = None) -> None:
        """One forward pass of the decoder stack (no LM head: logits are not needed).

        Args:
            handler: gets ``[B, Hq, T, T]`` maps per layer, or ``[B, Hq, len(rows), T]``.
            rows: query positions whose maps the handler needs; None for the full maps.
        """
        self._device = ids.device
        self._handler, self._rows = handler, None if rows is None else rows.to(ids.device)
        try:
            with torch.inference_mode():
                model.base_model(input_ids=ids, use_cache=False)
        finally:
            self._handler, self._rows = None, None

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None,
                 scaling: float | None = None, dropout: float = 0.0,
                 **kw: Any) -> tuple[torch.Tensor, None]:
        """transformers' attention-function signature.

        ``query`` is ``[B, Hq, Tq, D]``, ``key``/``value`` ``[B, Hkv, Tk, D]``; returns the
        output as ``[B, Tq, Hq, D]`` like transformers' own attention functions.
        """
        for unsupported in ("softcap", "s_aux"):
            if kw.get(unsupported) is not None:
                raise NotImplementedError(f"the head profiler does not support {unsupported}")
        from transformers.integrations.sdpa_attention import repeat_kv

        groups = query.shape[1] // key.shape[1]
        k, v = repeat_kv(key, groups), repeat_kv(value, groups)
        scale = module.scaling if scaling is None else scaling
        q_len, kv_len = query.shape[2], key.shape[2]
        dev = query.device
        if (self._handler is not None and self._rows is not None and attention_mask is None
                and not kw.get("sliding_window") and q_len == kv_len):
            # long-context rows: fused causal attention for the output (no [T, T] mask is
            # built), maps only for the rows, their causal bias [R, T]
            out = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True,
                                                                   scale=scale)
            rows = self._rows
            s = torch.matmul(query[:, :, rows], k.transpose(2, 3))
            bias = torch.zeros(len(rows), kv_len, device=dev).masked_fill_(
                torch.arange(kv_len, device=dev)[None] > rows[:, None], -math.inf)
            self._handler(module.layer_idx,
                          torch.softmax(torch.add(bias, s, alpha=scale), dim=-1))
            return out.transpose(1, 2).contiguous(), None
        # transformers builds no mask for attention functions it does not know, so the
        # causal (and any native sliding-window) mask is made here; queries are the last
        # q_len keys.
        q_pos = torch.arange(kv_len - q_len, kv_len, device=dev)[:, None]
        k_pos = torch.arange(kv_len, device=dev)[None]
        hidden = k_pos > q_pos
        if kw.get("sliding_window"):
            hidden |= k_pos <= q_pos - kw["sliding_window"]
        bias = torch.zeros(hidden.shape, device=dev).masked_fill_(hidden, -math.inf)
        if attention_mask is not None:
            m = attention_mask[..., :kv_len]
            bias = bias.masked_fill(~m, -math.inf) if m.dtype == torch.bool else bias + m
        if self._handler is not None and self._rows is not None:
            # rows under a mask or a native window: fused attention with the explicit bias
            out = torch.nn.functional.scaled_dot_product_attention(query, k, v,
                                                                   attn_mask=bias, scale=scale)
            rows = self._rows
            s = torch.matmul(query[:, :, rows], k.transpose(2, 3))
            self._handler(module.layer_idx,
                          torch.softmax(torch.add(bias[..., rows, :], s, alpha=scale), dim=-1))
            return out.transpose(1, 2).contiguous(), None
        shape = (*query.shape[:3], kv_len)
        scores = torch.matmul(query, k.transpose(2, 3), out=self.buffer("scores", shape))
        probs = torch.softmax(torch.add(bias, scores, alpha=scale, out=scores), dim=-1,
                              out=self.buffer("probs", shape))
        if self._handler is not None:
            self._handler(module.layer_idx, probs)
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


def load_model(model_dir: str | Path, attn_implementation: str = PROBE_NAME,
               probe: AttentionProbe | None = None, device: str = "cpu") -> Any:
    """The HF causal LM in fp32 (eval mode, on ``device``) with the given attention
    function; with :data:`PROBE_NAME`, ``probe`` (or a fresh one) is registered for it."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    if attn_implementation == PROBE_NAME:
        AttentionInterface.register(PROBE_NAME, probe or AttentionProbe())
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return model.eval().to(device)
