"""Layers: nn.Modules around the ops (projections, short convolution, gates, norms)."""

from .conv import ShortConv
from .cache import LayerState
from .ttr_layer import TTRLayer

__all__ = ["LayerState", "ShortConv", "TTRLayer"]
