"""Model: config dataclasses, the transformer and its variant registries."""

from llm.model.config import AttentionConfig, FFNConfig, ModelConfig, MoEConfig
from llm.model.transformer import Transformer

__all__ = ["AttentionConfig", "FFNConfig", "ModelConfig", "MoEConfig", "Transformer"]
