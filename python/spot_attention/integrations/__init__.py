"""Integrations of SpotAttention with model libraries (Hugging Face transformers: ``hf``)."""

from .hf import (
    BudgetStats,
    LayerPolicy,
    LearnedSelection,
    SelectionMethod,
    SelectorKeyStore,
    SpotAttention,
    SpotCache,
    attach,
    attached,
    detach,
    full_attention_layers,
    is_attached,
)

__all__ = [
    "BudgetStats",
    "LayerPolicy",
    "LearnedSelection",
    "SelectionMethod",
    "SelectorKeyStore",
    "SpotAttention",
    "SpotCache",
    "attach",
    "attached",
    "detach",
    "full_attention_layers",
    "is_attached",
]
