"""SegPagedAttention: local heads keep only their sink and window pages in vLLM's paged KV
cache (``docs/segpaged-design.md``).

Step 1 of the plan: the KV-cache spec, its manager and their registration
(:mod:`redknot_vllm.segpaged.spec`). Nothing here is wired into the plugin yet.
"""

from __future__ import annotations

from redknot_vllm.segpaged.spec import SinkSlidingWindowManager, SinkSlidingWindowSpec, register

__all__ = ["SinkSlidingWindowManager", "SinkSlidingWindowSpec", "register"]
