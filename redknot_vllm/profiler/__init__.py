"""Head profiler: score every (layer, KV head) and classify it ``global`` or ``local``.

The HF model runs in fp32 on CPU with a probe attention function
(:class:`~redknot_vllm.profiler.probe.AttentionProbe`, which owns its scratch buffers)
registered with transformers' ``AttentionInterface``. The probe computes eager causal attention
probabilities ``P = softmax(Q K^T * scaling + causal mask)``, returns ``P @ V`` (the
model's normal attention output) and hands ``P`` of each layer to a recorder that folds it
into running per-query-head statistics, so no more than one layer's maps are alive at a
time. Three scores per (layer, query head), each reduced to KV heads by the max over the
query heads of its GQA group (a KV head must stay global if any of its query heads needs
the far context):

1. **prefix_shift** (the seed's): for a calibration text ``x`` and each of two unrelated
   prefixes ``p``, the maps of ``x`` alone (``A0``) are compared with the ``x`` block of the
   maps of ``p + x`` (``A1[:, P:, P:]``); the score is ``clamp(1 - cos(A0_h, A1x_h), 0, 1)``
   over the flattened ``L x L`` maps, averaged over texts and prefixes. ``x``, ``p1 + x`` and
   ``p2 + x`` run as one right-padded batch: causal attention never sees the padding, and
   both maps are in hand in the same layer call, so ``A0`` is never stored.
2. **edge_mass** (the seed's, per window ``W``): from ``A0``, the attention mass each query
   ``i`` puts outside what a local head keeps, ``{j < sink} ∪ {i - W < j <= i}``, averaged
   over the queries that have such keys at all (``i >= sink + W``; earlier ones would
   dilute it), then over the texts long enough to have any. A window no text reaches
   scores 0 (a local head that wide loses nothing on these texts) and is warned about.
3. **retrieval** (in the spirit of DuoAttention / Retrieval Heads): synthetic needle tasks.
   A needle "The secret code for the {name} archive is {5 digits}." sits at a random depth
   in the first 60% of filler prose, followed by the question and the teacher-forced
   answer. The score is the mean attention mass that the positions predicting the answer
   tokens put on the needle's number tokens, averaged over samples.

:func:`~redknot_vllm.profiler.classify.classify` normalises each score matrix by its max
over all heads (edge_mass at the chosen window), takes the (optionally weighted) max of the
three, and makes the top ``round(L * H * global_fraction)`` heads global; the rest are local
with that window and sink. The scores travel in the JSON's ``profiling_meta`` so a sweep
can re-classify with :func:`load_scores` without profiling again.

Calibration texts are deterministic synthetic prose (seeded in a domain of their own, so
they never coincide with evaluation prompts) or user files: a folder of ``.txt`` files (one
text each), a ``.jsonl`` with a ``"text"`` field per line, or one ``.txt`` file, which is cut
into consecutive ``max_tokens`` chunks. Texts keep the tokenizer's default leading special
tokens and are truncated to ``max_tokens`` tokens.

Modules: :mod:`.scores` (the data), :mod:`.probe` (the attention function),
:mod:`.prose` and :mod:`.samples` (inputs), :mod:`.recorder` (score sums), :mod:`.run`
(:func:`profile_heads`), :mod:`.classify` (:func:`classify`, :func:`profile`).
"""

from __future__ import annotations

from redknot_vllm.profiler.classify import (
    METHOD,
    classify,
    combined_scores,
    profile,
    ranked_heads,
)
from redknot_vllm.profiler.probe import PROBE_NAME, AttentionProbe, load_model
from redknot_vllm.profiler.prose import load_texts, synthetic_texts
from redknot_vllm.profiler.run import DEFAULT_WINDOWS, profile_heads, profile_long
from redknot_vllm.profiler.scores import SCORE_NAMES, ProfileError, ProfileScores, load_scores

__all__ = ["DEFAULT_WINDOWS", "METHOD", "PROBE_NAME", "SCORE_NAMES", "AttentionProbe",
           "ProfileError", "ProfileScores", "classify", "combined_scores", "load_model",
           "load_scores", "load_texts", "profile", "profile_heads", "profile_long", "ranked_heads",
           "synthetic_texts"]
