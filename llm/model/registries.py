"""The model's registries, one per axis of variation. Implementations register themselves."""

from __future__ import annotations

from llm.registry import Registry

POSITIONAL: Registry = Registry("positional encoding")  # llm/model/positional.py
NORM: Registry = Registry("norm")  # llm/model/layers.py
MLP: Registry = Registry("mlp")  # llm/model/layers.py
ATTENTION: Registry = Registry("attention kind")  # llm/model/attention.py
ATTENTION_IMPL: Registry = Registry("attention implementation")  # llm/model/attention.py
FFN: Registry = Registry("ffn kind")  # llm/model/block.py
REMAT: Registry = Registry("remat policy")  # llm/model/transformer.py


def _load_all() -> None:
    # Importing the modules fills the registries.
    from llm.model import attention, block, differential, infini, layers, mla, moe, positional, transformer  # noqa: F401, PLC0415


def check_model_names(cfg) -> None:
    """Raise ConfigError naming the valid choices for any unknown variant name in `cfg`."""
    _load_all()
    POSITIONAL.get(cfg.positional, "model.positional")
    NORM.get(cfg.norm, "model.norm")
    MLP.get(cfg.mlp, "model.mlp")
    REMAT.get(cfg.remat, "model.remat")
    ATTENTION.get(cfg.attention.kind, "model.attention.kind")
    for kind in cfg.attention.pattern or ():
        ATTENTION.get(kind, "model.attention.pattern")
    FFN.get(cfg.ffn.kind, "model.ffn.kind")
    from llm.model.moe import MOE_IMPLS, ROUTERS  # noqa: PLC0415

    ROUTERS.get(cfg.ffn.moe.router, "model.ffn.moe.router")
    MOE_IMPLS.get(cfg.ffn.moe.impl, "model.ffn.moe.impl")
    ATTENTION_IMPL.get(cfg.attention.impl, "model.attention.impl")
