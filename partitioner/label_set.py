"""The closed set of sensitivity labels (docs/design.md, "Labels")."""

from __future__ import annotations

from enum import StrEnum


class Label(StrEnum):
    EMBEDDING = "embedding"
    ATTENTION_PROJECTION = "attention_projection"
    ATTENTION = "attention"
    NONLINEAR = "nonlinear"
    NORM = "norm"
    FFN = "ffn"
    LORA = "lora"
    LM_HEAD = "lm_head"
    ELEMENTWISE = "elementwise"
    SHAPE = "shape"
    OTHER = "other"


ALL_LABELS: frozenset[Label] = frozenset(Label)

# Labels whose nodes read model weights; pinning them to the GPU contradicts protecting the model.
WEIGHT_BEARING: frozenset[Label] = frozenset(
    {
        Label.EMBEDDING,
        Label.ATTENTION_PROJECTION,
        Label.NORM,
        Label.FFN,
        Label.LORA,
        Label.LM_HEAD,
    }
)
