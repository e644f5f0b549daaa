"""The RedKnot metadata builder: plans each step once, for every RedKnot layer."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)

from redknot_vllm import compat, envs
from redknot_vllm.attention.metadata import RedKnotAttentionMetadata, build_metadata
from redknot_vllm.runtime import find_runtime
from redknot_vllm.segpaged.spec import SinkSlidingWindowSpec

logger = init_logger(__name__)


class RedKnotMetadataBuilder(AttentionMetadataBuilder[RedKnotAttentionMetadata]):
    """Builds the step's metadata once; every layer reuses it.

    A row counts as prefill while its request is still in its prompt
    (``CommonAttentionMetadata.is_prefilling``, set by vLLM's V1 model runner), so a
    one-token final chunk of a prompt is still prefill and chunked and unchunked prefill
    agree.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    # Ask vLLM to put single-token (decode) rows first: the decode pass of local heads is
    # then a slice of the batch.
    reorder_batch_threshold: int | None = 1

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        # On CUDA, batches of single-token rows run vLLM's FlashAttention path, which can be
        # captured whole; everything else runs eagerly between piecewise graphs.
        from vllm.platforms import current_platform

        if current_platform.is_cuda():
            # SegPaged's local group attends by head class in decode too: in a batch of
            # one-token rows its token fields are persistent buffers (a fixed arange and
            # vLLM's own positions), so the FA3 window call and the sink merge are captured
            # whole. Not on RedKnot's torch path, which plans from host lists each step.
            if isinstance(kv_cache_spec, SinkSlidingWindowSpec) and (
                    envs.attention_impl() == "torch" or not envs.segpaged_decode_graphs()):
                return AttentionCGSupport.NEVER
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runtime = find_runtime(vllm_config)
        # SegPaged: the local heads' KV-cache group has a builder of its own; the step is
        # opened once, by the global group's (both see the same rows and tokens)
        self._local = isinstance(kv_cache_spec, SinkSlidingWindowSpec)
        self._opens_step = not self._local
        hc = None if self.runtime is None else self.runtime.config.head_config
        self._tail_full_tokens = 0 if hc is None else hc.tail_full_tokens
        self._fa_builder = None
        self._row_ids: torch.Tensor | None = None
        self._not_prefill: torch.Tensor | None = None
        if device.type == "cuda" and self._local:
            # a one-token-row batch's token fields, at fixed addresses for captured graphs
            n = vllm_config.scheduler_config.max_num_batched_tokens
            self._row_ids = torch.arange(n, dtype=torch.long, device=device)
            self._not_prefill = torch.zeros(n, dtype=torch.bool, device=device)
        if device.type == "cuda":
            self._warm_up_kernels(kv_cache_spec, vllm_config)
        if device.type == "cuda" and not self._local:  # the local group never decodes dense
            from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

            self._fa_builder = FlashAttentionMetadataBuilder(kv_cache_spec, layer_names,
                                                             vllm_config, device)

    def _warm_up_kernels(self, kv_cache_spec: Any, vllm_config: Any) -> None:
        """Compile RedKnot's Triton kernels now, not on the first request (a JIT compile
        mid-traffic stalls every request in flight)."""
        if self.runtime is None:
            return
        from redknot_vllm.kernels.headclass_attention import FULL
        from redknot_vllm.kernels.headclass_attention_cuda import warm_up_sink_merge

        groups = {(g.window, g.sink) for p in self.runtime.plans.values() for g in p.groups
                  if g.window != FULL and g.sink > 0 and not g.topk}
        if not groups:
            return
        mc = vllm_config.model_config
        try:
            pc = vllm_config.parallel_config  # the model's ratio: a SegPaged group holds
            # only some of the KV heads but the same query heads per KV head
            warm_up_sink_merge(mc.get_num_attention_heads(pc) // mc.get_num_kv_heads(pc),
                               kv_cache_spec.head_size,
                               kv_cache_spec.block_size, groups, mc.dtype, self.device)
        except Exception as e:  # a missed warm-up costs one compile later, nothing else
            logger.warning("RedKnot: warming up the sink-merge kernel failed (%s: %s); it "
                           "compiles on the first prefill instead", type(e).__name__, e)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata
                                    ) -> RedKnotAttentionMetadata:
        """Captured graphs serve uniform single-token batches: build them as decode."""
        md = self.build(0, common_attn_metadata, force_decode=True)
        if self._fa_builder is not None:
            md.fa = self._fa_builder.build_for_cudagraph_capture(common_attn_metadata)
        return md

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False, force_decode: bool = False
              ) -> RedKnotAttentionMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = compat.seq_lens_cpu(cm)[:num_reqs].tolist()
        prefilling = compat.is_prefilling(cm)
        if force_decode:
            is_prefill = [False] * num_reqs
        elif prefilling is None:
            logger.warning_once(
                "RedKnot: the model runner does not report is_prefilling (vLLM's v2 model "
                "runner); treating rows with more than one new token as prefill. Set "
                "VLLM_USE_V2_MODEL_RUNNER=0 for exact prefill detection.")
            is_prefill = [qsl[i + 1] - qsl[i] > 1 for i in range(num_reqs)]
        else:
            is_prefill = [bool(x) for x in prefilling[:num_reqs].tolist()]
        tail = self._tail_full_tokens
        # SegPaged's local group, every row one token (decode, or a prompt's last token):
        # prefill or not changes nothing for local heads, so the token fields are the
        # persistent ones (row t is token t, its position vLLM's) and the step can replay
        # a captured graph; padded rows get the null block, whatever they compute is dropped
        uniform = (self._row_ids is not None and cm.max_query_len == 1
                   and cm.num_actual_tokens <= self._row_ids.numel()
                   and cm.positions is not None)
        md = build_metadata(
            query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, is_prefill_cpu=is_prefill,
            block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping,
            device=self.device, query_start_loc=cm.query_start_loc, seq_lens=cm.seq_lens,
            max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            num_actual_tokens=cm.num_actual_tokens,
            full_tail_cpu=[tail] * num_reqs if tail else None,
            token_fields=self._local and not uniform)
        if uniform:
            n = md.num_actual_tokens
            md.token_row, md.token_pos = self._row_ids[:n], cm.positions[:n]
            md.token_is_prefill = self._not_prefill[:n]
        if self.runtime is not None and not force_decode and self._opens_step:
            self.runtime.begin_step(md)
        if not md.has_prefill and self._fa_builder is not None and not force_decode:
            md.fa = self._fa_builder.build(common_prefix_len, cm, fast_build)
        return md
