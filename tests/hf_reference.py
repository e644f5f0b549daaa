"""An independent reference: HF transformers' Llama with head-class attention masks.

The attention function below applies :func:`headclass_attention_ref` per layer and KV head
(queries at positions < ``prompt_len`` use the head classes, block-sparse retrieval heads
included, except the prompt's last ``hc.tail_full_tokens``, and later ones attend fully),
so greedy decoding with it is what RedKnot attention (without sparse FFN) must produce for
a prompt prefilled in one chunk.
"""

from __future__ import annotations

import torch

from redknot_vllm.head_config import HeadClass, HeadConfig
from redknot_vllm.kernels.headclass_attention import FULL, headclass_attention_ref


def greedy_reference(model_dir: str, hc: HeadConfig, prompt_ids: list[int],
                     max_tokens: int, classed_decode: bool = False) -> list[int]:
    """Greedy tokens under the head classes' masks; ``classed_decode``: generated tokens
    attend by head class as well (SegPaged's local heads), not fully."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    prompt_len = len(prompt_ids)

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        li = module.layer_idx
        _, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        q_pos = torch.arange(kv_len - q_len, kv_len)
        windows, sinks, retrieval = [], [], {}
        for h in range(key.shape[1]):
            local = hc.effective_class(li, h) is HeadClass.LOCAL
            windows.append(hc.windows[li][h] if local else FULL)
            sinks.append(hc.sinks[li][h] if local else 0)
            rb = hc.retrieval_blocks
            if rb is not None and hc.effective_class(li, h) is HeadClass.RETRIEVAL:
                retrieval[h] = (rb.top_k, rb.block, rb.window)
        out = torch.empty(q_len, query.shape[1], query.shape[3])
        pre = q_pos < (kv_len + 1 if classed_decode else prompt_len)
        for sel, w, retr in ((pre, torch.tensor(windows), retrieval),
                             (~pre, torch.full((len(windows),), FULL), None)):
            if sel.any():
                out[sel] = headclass_attention_ref(
                    query[0].transpose(0, 1)[sel], key[0].transpose(0, 1),
                    value[0].transpose(0, 1), q_pos[sel], w, torch.tensor(sinks),
                    scaling or module.scaling,
                    full_from=prompt_len - hc.tail_full_tokens if hc.tail_full_tokens else None,
                    retrieval=retr)
        return out[None].to(query.dtype), None

    AttentionInterface.register("redknot_ref", attend)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="redknot_ref")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                             do_sample=False, attention_mask=torch.ones(1, prompt_len,
                                                                         dtype=torch.long))
    return out[0, prompt_len:].tolist()
