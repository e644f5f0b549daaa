"""Offline KV reuse: a document's KV computed once, relocated by RoPE, spliced into vLLM pages.

vLLM's scheduler only knows a computed *prefix* per request, so stored segments in the middle
of a prompt cannot be claimed as external tokens. RedKnot lets vLLM schedule every token and
skips the work itself. The package, in the order a request meets it:

* :mod:`.params`: a request's options (``kv_transfer_params["redknot"]``), validated;
* :mod:`.keys`: an engine's reuse setup and segment key space (model fingerprint, head
  config, tokenizer, KV layout);
* :mod:`.catalog` and :mod:`.scheduler` (scheduler side, the connector's scheduler half):
  stored segments are found in the prompt by content (their first 16 tokens, then every
  token compared), or taken from the ranges a request marks. A request that reuses anything
  gets its prefix-cache block hashes salted from its first computed block on, so its
  approximate KV can never serve an exact-prefix hit;
* :mod:`.policy`: which tokens of a segment are recomputed (``selective``) or every token
  (``seed``);
* :mod:`.splice` and :mod:`.worker` (worker side, driven by the connector's worker half
  before and after each forward): for the step's tokens inside a segment, the stored K is
  relocated from ``[0, L)`` to its position with the model's own rotary cache
  (:mod:`redknot_vllm.relocation`), K/V are written into the request's pages for every
  layer, and the step's rows are restricted to the tokens still computed
  (:func:`redknot_vllm.attention.metadata.restrict_tokens`), so each run of computed tokens
  attends to the spliced KV before it. Under the ``seed`` policy every token is computed
  and the local heads' KV of reused tokens is overwritten before attention. After the
  forward, prompts sent with ``{"store": true}`` are stored and ``{"probe": ...}`` measures
  how far a stored segment's KV is from in-context KV (the ``deviation`` the selective
  policy recomputes by);
* :mod:`.precompute`: ``redknot precompute`` / :func:`precompute`.

Computing a token is always valid (its fresh KV overwrites the spliced one), so every
fallback computes: a segment evicted between plan and splice, CUDA-graph steps, rows whose
tokens would all be dropped. Each fallback is logged once.
"""

from __future__ import annotations

from redknot_vllm.reuse.precompute import DEFAULT_PROBE, precompute, read_docs

__all__ = ["DEFAULT_PROBE", "precompute", "read_docs"]
