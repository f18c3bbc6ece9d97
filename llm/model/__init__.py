"""Model: config dataclasses, the transformer and its variant registries."""

from llm.model.config import AttentionConfig, FFNConfig, ModelConfig
from llm.model.transformer import Transformer

__all__ = ["AttentionConfig", "FFNConfig", "ModelConfig", "Transformer"]
