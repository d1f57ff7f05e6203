"""Layers: nn.Modules around the ops (projections, short convolution, gates, norms)."""

from .conv import ShortConv
from .ttr_layer import LayerState, TTRLayer

__all__ = ["LayerState", "ShortConv", "TTRLayer"]
