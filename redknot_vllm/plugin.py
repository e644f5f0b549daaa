"""The ``vllm.general_plugins`` entry point: runs in every vLLM process.

Registers, by lazy ``module:Class`` strings, the RedKnot model classes (opt-in via
``hf_overrides``), the static ``CUSTOM`` attention-backend slot and SegPaged's KV-cache
spec. Idempotent; touches no device (the spec's module imports vLLM's KV-cache manager,
which the engine imports anyway).
"""

from __future__ import annotations

from redknot_vllm.architectures import override_classes

BACKEND_PATH = "redknot_vllm.attention.backend.RedKnotAttentionBackend"


def _route_logs_through_vllm() -> None:
    """Give the ``redknot_vllm`` loggers vLLM's handlers, format and level.

    vLLM configures only the ``vllm`` logger tree; without this, RedKnot's INFO lines
    (effective configuration, per-request stats) would be swallowed by the root logger.
    """
    import logging

    src, dst = logging.getLogger("vllm"), logging.getLogger("redknot_vllm")
    if src.handlers and not dst.handlers:
        for h in src.handlers:
            dst.addHandler(h)
        dst.setLevel(src.level)
        dst.propagate = False


def register() -> None:
    """Register RedKnot's models and attention backend in this process."""
    _route_logs_through_vllm()
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from redknot_vllm.compat import check_vllm_version

    check_vllm_version()
    supported = ModelRegistry.get_supported_archs()
    for arch, path in override_classes().items():
        if arch not in supported:
            ModelRegistry.register_model(arch, path)
    # Layers get the backend class directly (Attention(attn_backend=...)); the enum slot
    # only has to resolve, because Attention looks its name up in AttentionBackendEnum.
    if not AttentionBackendEnum.CUSTOM.is_overridden():
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    # SegPaged's KV-cache spec and manager: the scheduler looks them up in this registry,
    # in whichever process it runs
    from redknot_vllm.segpaged.spec import register as register_segpaged_spec

    register_segpaged_spec()
