"""SegPagedAttention: local heads keep only their sink and window pages in vLLM's paged KV
cache (``docs/segpaged-design.md``).

Steps 1-2 of the plan: the KV-cache spec, its manager and their registration
(:mod:`redknot_vllm.segpaged.spec`); the model-wide split of KV heads into the global and
the local group (:mod:`redknot_vllm.segpaged.split`). Nothing here is wired into the plugin
yet.
"""

from __future__ import annotations

from redknot_vllm.segpaged.spec import SinkSlidingWindowManager, SinkSlidingWindowSpec, register

__all__ = ["SinkSlidingWindowManager", "SinkSlidingWindowSpec", "register"]
