"""The RedKnot attention backend for vLLM: head-class prefill, full-attention decode.

Four parts, as in vLLM's own backends:

* :class:`RedKnotAttentionBackend` declares capabilities;
* :class:`RedKnotMetadataBuilder` turns ``CommonAttentionMetadata`` into
  :class:`RedKnotAttentionMetadata` once per step (all layers share it);
* :class:`RedKnotAttentionImpl` runs a layer: prefill rows attend per head class (local
  heads see sinks plus a window), decode rows attend to the whole KV cache, and the
  per-token output norm is left in the metadata for the sparse FFN.

Decode uses full attention over all KV on purpose: every head's KV is stored for every
token, so decode reads exactly what dense vLLM would, and the quality risk of RedKnot stays
confined to prefill. (Trimming local heads' decode KV is SegPagedAttention's job.)

A row counts as prefill while its request is still in its prompt
(``CommonAttentionMetadata.is_prefilling``, set by vLLM's V1 model runner), so a one-token
final chunk of a prompt is still prefill and chunked and unchunked prefill agree.

On CPU the layers run plain torch (``kernels/headclass_attention.py``) over a plain K|V
layout, so KV can be read back and written (stock CPU_ATTN packs blocks per ISA and cannot).
On CUDA they run FA3 per head group plus a Triton sink merge
(``kernels/headclass_attention_cuda.py``) over the same layout FLASH_ATTN uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from redknot_vllm import compat
from redknot_vllm.attention.plan import LayerPlan
from redknot_vllm.kernels.headclass_attention import paged_headclass_attention, write_kv_cache
from redknot_vllm.kernels.headclass_attention_cuda import paged_headclass_attention_cuda

logger = init_logger(__name__)


class RedKnotAttentionBackend(compat.KVCacheShapeMixin, AttentionBackend):
    """Declares what the RedKnot backend supports; chosen per layer by the model override."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                      torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        # Must name an existing AttentionBackendEnum member; the plugin registers CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[RedKnotAttentionImpl]:
        return RedKnotAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[RedKnotMetadataBuilder]:
        return RedKnotMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class RedKnotAttentionMetadata:
    """Per-step metadata shared by every RedKnot layer of a KV-cache group.

    Token-level fields are only built when the step has prefill rows (``has_prefill``);
    pure decode steps attend fully and run the FFN densely.
    """

    num_actual_tokens: int  # Number of tokens excluding padding.
    num_reqs: int
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32 (device)
    seqused_k: torch.Tensor  # [num_reqs] int32 context lengths incl. this step (device)
    max_query_len: int
    max_seq_len: int
    query_start_loc: list[int]  # num_reqs + 1 token offsets (host)
    seq_lens: list[int]  # num_reqs context lengths incl. this step (host)
    is_prefill: list[bool]  # num_reqs: request still in its prompt (host)
    has_prefill: bool
    want_importance: bool  # the sparse FFN reads token_importance_sq
    token_row: torch.Tensor | None = None  # [num_actual_tokens] row of each token
    token_pos: torch.Tensor | None = None  # [num_actual_tokens] absolute position
    token_is_prefill: torch.Tensor | None = None  # [num_actual_tokens] bool
    tokens_to_row_end: torch.Tensor | None = None  # [num_actual_tokens], 0 = row's last token
    num_decode_tokens: int = 0  # tokens of rows that are not in their prompt
    decode_prefix_rows: int | None = None  # those rows are exactly rows [0, this) if not None
    max_decode_query_len: int = 0
    decode_rows: torch.Tensor | None = None  # [n] row indices (when not a prefix)
    decode_token_index: torch.Tensor | None = None  # [m] token indices (when not a prefix)
    decode_cu_seqlens: torch.Tensor | None = None  # [n + 1] int32 (when not a prefix)
    fa: Any = None
    """CUDA, steps without prefill rows: vLLM's own FlashAttentionMetadata (decode runs as
    dense vLLM does, full CUDA graphs included)."""
    token_importance_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    """attention layer name -> [num_actual_tokens] fp32 Σ over this rank's heads of o²."""
    ffn_kept: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer index -> [num_reqs] int64 prefill tokens whose FFN ran (sparse layers only)."""
    row_first_slots: list[int] | None = None
    """KV reuse (:func:`restrict_tokens`): per row, the slot of its request's first token of
    this step, which the connector keys requests by; None: the slot of the row's own first
    token."""
    reused: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """KV reuse: request first slot -> position ranges spliced from stored KV, not computed."""
    reuse_overwrite: Any = None
    """KV reuse, seed policy: (slots, k, v, layer index -> row of k/v) written over the local
    heads' fresh KV of reused tokens before attention (:mod:`redknot_vllm.reuse`)."""

    def first_slots(self) -> list[int]:
        """Per row, the slot that identifies its request in this step (one transfer)."""
        if self.row_first_slots is not None:
            return self.row_first_slots
        if not self.num_reqs:
            return []
        return self.slot_mapping[torch.tensor(self.query_start_loc[:-1])].tolist()

    def ffn_kept_host(self) -> dict[int, list[int]]:
        """``ffn_kept`` on the host, copied in one transfer (after the forward)."""
        if not self.ffn_kept:
            return {}
        layers = list(self.ffn_kept)
        rows = torch.stack([self.ffn_kept[li] for li in layers]).cpu().tolist()
        return dict(zip(layers, rows, strict=True))

    def record_ffn_kept(self, layer: int, keep: torch.Tensor) -> None:
        assert self.token_row is not None and self.token_is_prefill is not None
        counts = torch.zeros(self.num_reqs, dtype=torch.long, device=keep.device)
        self.ffn_kept[layer] = counts.index_add_(
            0, self.token_row, (keep & self.token_is_prefill).long())


def restrict_tokens(md: RedKnotAttentionMetadata, keep: torch.Tensor
                    ) -> tuple[RedKnotAttentionMetadata, torch.Tensor]:
    """Metadata for computing only the kept tokens of a prefill step (KV reuse).

    Every maximal run of kept tokens of a row becomes a row of its own, with the row's block
    table and ``seq_len`` = the position after the run's last token, so each run attends
    causally to everything before it: KV spliced into the cache for the dropped tokens, and
    the run's own fresh KV. ``keep`` is a host bool ``[num_actual_tokens]``.

    Returns:
        (metadata, kept token indices on the device).
    """
    assert keep.device.type == "cpu" and keep.numel() == md.num_actual_tokens
    firsts = md.first_slots()
    qsl, rows, seq_lens, prefill, first_slots = [0], [], [], [], []
    for r in range(md.num_reqs):
        a, b = md.query_start_loc[r], md.query_start_loc[r + 1]
        k = keep[a:b]
        if bool(k.all()):
            runs = [(0, b - a)]
        else:
            edges = torch.diff(k.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                               append=torch.zeros(1, dtype=torch.int8))
            starts = (edges == 1).nonzero().flatten().tolist()
            ends = (edges == -1).nonzero().flatten().tolist()
            runs = list(zip(starts, ends, strict=True))
        end_pos = md.seq_lens[r] - (b - a)  # position of the row's first token
        for s, e in runs:
            qsl.append(qsl[-1] + e - s)
            rows.append(r)
            seq_lens.append(end_pos + e)
            prefill.append(md.is_prefill[r])
            first_slots.append(firsts[r])
    dev = md.slot_mapping.device
    kept = keep.nonzero().flatten().to(dev, non_blocking=True)
    q_lens = [qsl[i + 1] - qsl[i] for i in range(len(rows))]
    out = RedKnotAttentionMetadata(
        num_actual_tokens=qsl[-1],
        num_reqs=len(rows),
        block_table=md.block_table[torch.tensor(rows, device=md.block_table.device)],
        slot_mapping=md.slot_mapping[kept],
        cu_seqlens_q=torch.tensor(qsl, dtype=torch.int32).to(dev, non_blocking=True),
        seqused_k=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_start_loc=qsl,
        seq_lens=seq_lens,
        is_prefill=prefill,
        has_prefill=any(prefill),
        want_importance=md.want_importance,
        row_first_slots=first_slots,
        reused=md.reused,
        reuse_overwrite=md.reuse_overwrite,
    )
    if out.has_prefill:
        add_token_fields(out, q_lens, dev)
    return out, kept


class RedKnotMetadataBuilder(AttentionMetadataBuilder[RedKnotAttentionMetadata]):
    """Builds the step's metadata once; every layer reuses it."""

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
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from redknot_vllm.runtime import find_runtime

        self.runtime = find_runtime(vllm_config)
        self._fa_builder = None
        if device.type == "cuda":
            from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

            self._fa_builder = FlashAttentionMetadataBuilder(kv_cache_spec, layer_names,
                                                             vllm_config, device)

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
        num_reqs, num_tokens = cm.num_reqs, cm.num_actual_tokens
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = compat.seq_lens_cpu(cm)[:num_reqs].tolist()
        q_lens = [qsl[i + 1] - qsl[i] for i in range(num_reqs)]
        prefilling = compat.is_prefilling(cm)
        if force_decode:
            is_prefill = [False] * num_reqs
        elif prefilling is None:
            logger.warning_once(
                "RedKnot: the model runner does not report is_prefilling (vLLM's v2 model "
                "runner); treating rows with more than one new token as prefill. Set "
                "VLLM_USE_V2_MODEL_RUNNER=0 for exact prefill detection.")
            is_prefill = [q > 1 for q in q_lens]
        else:
            is_prefill = [bool(x) for x in prefilling[:num_reqs].tolist()]
        md = RedKnotAttentionMetadata(
            num_actual_tokens=num_tokens,
            num_reqs=num_reqs,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            cu_seqlens_q=cm.query_start_loc,
            seqused_k=cm.seq_lens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            is_prefill=is_prefill,
            has_prefill=any(is_prefill),
            want_importance=self.runtime is not None and self.runtime.sparse_ffn is not None,
        )
        if md.has_prefill:
            add_token_fields(md, q_lens, self.device)
            if self.runtime is not None:
                self.runtime.begin_step(md)
        elif self._fa_builder is not None and not force_decode:
            md.fa = self._fa_builder.build(common_prefix_len, cm, fast_build)
        return md


def add_token_fields(md: RedKnotAttentionMetadata, q_lens: list[int],
                     dev: torch.device) -> None:
    """Per-token maps and the decode-row layout, built on the host, copied once."""
    n = md.num_actual_tokens
    rows = torch.arange(md.num_reqs).repeat_interleave(torch.tensor(q_lens))
    ends = torch.tensor(md.query_start_loc[1:])[rows]
    t = torch.arange(n)
    pos = torch.tensor(md.seq_lens)[rows] - ends + t
    prefill = torch.tensor(md.is_prefill, dtype=torch.bool)[rows]
    packed = torch.stack([rows, pos, ends - 1 - t, prefill.long()]).to(dev, non_blocking=True)
    md.token_row, md.token_pos, md.tokens_to_row_end = packed[0], packed[1], packed[2]
    md.token_is_prefill = packed[3].bool()
    dec = [r for r, p in enumerate(md.is_prefill) if not p]
    if not dec:
        return
    md.num_decode_tokens = sum(q_lens[r] for r in dec)
    md.max_decode_query_len = max(q_lens[r] for r in dec)
    if dec == list(range(len(dec))):
        md.decode_prefix_rows = len(dec)
        return
    idx = torch.cat([torch.arange(md.query_start_loc[r], md.query_start_loc[r + 1])
                     for r in dec])
    cu = torch.tensor([0] + [q_lens[r] for r in dec]).cumsum(0).to(torch.int32)
    md.decode_rows = torch.tensor(dec).to(dev, non_blocking=True)
    md.decode_token_index = idx.to(dev, non_blocking=True)
    md.decode_cu_seqlens = cu.to(dev, non_blocking=True)


class RedKnotAttentionImpl(AttentionImpl[RedKnotAttentionMetadata]):
    """Runs one layer on CPU (torch) or CUDA (FA3 + Triton)."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        redknot_plan: LayerPlan | None = None,
    ) -> None:
        unsupported = [name for name, v in (
            ("alibi_slopes", alibi_slopes), ("sliding_window", sliding_window),
            ("logits_soft_cap", logits_soft_cap),
            ("kv_sharing_target_layer_name", kv_sharing_target_layer_name)) if v]
        if kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            unsupported.append(f"kv_cache_dtype={kv_cache_dtype}")
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attn_type={attn_type}")
        if unsupported:
            raise NotImplementedError(
                f"RedKnot attention does not support {', '.join(unsupported)}; serve this "
                "model without RedKnot")
        if redknot_plan is None:
            raise ValueError("RedKnotAttentionImpl needs a redknot_plan (built by the model "
                             "override)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.plan = redknot_plan
        self._fa_impl = None
        from vllm.platforms import current_platform

        if current_platform.is_cuda():
            from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

            self._fa_impl = FlashAttentionImpl(num_heads, head_size, scale, num_kv_heads, None,
                                               None, kv_cache_dtype, None, attn_type, None)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if key.is_cuda:
            from vllm._custom_ops import reshape_and_cache_flash

            key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
            reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                    self.kv_cache_dtype, layer._k_scale, layer._v_scale)
        else:
            write_kv_cache(key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: RedKnotAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention for one layer.

        Args:
            query: ``[num_tokens, num_heads, head_size]``.
            key, value: ``[num_tokens, num_kv_heads, head_size]`` (already in the cache).
            kv_cache: logical ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
            output: ``[num_tokens, num_heads, head_size]``, written in place.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("RedKnot attention has no fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output.fill_(0)
        md = attn_metadata
        if md.fa is not None:  # CUDA, no prefill rows: exactly dense vLLM's attention
            assert self._fa_impl is not None
            return self._fa_impl.forward(layer, query, key, value, kv_cache, md.fa, output)
        if md.reuse_overwrite is not None:
            from redknot_vllm.reuse import overwrite_local_heads

            overwrite_local_heads(md.reuse_overwrite, self.plan, kv_cache)
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        o = output[:n].view(n, self.num_heads, self.head_size)
        if q.is_cuda:
            paged_headclass_attention_cuda(q, kv_cache, md, self.plan.groups, self.scale, o)
        else:
            paged_headclass_attention(q, kv_cache, md.block_table, md.query_start_loc,
                                      md.seq_lens, md.is_prefill, self.plan.groups, self.scale,
                                      o)
        if md.want_importance and md.has_prefill:
            # one fused fp32 reduction; no fp32 copy of the output is materialised
            md.token_importance_sq[layer.layer_name] = torch.linalg.vector_norm(
                o.reshape(n, -1), dim=-1, dtype=torch.float32).square()
        return output
