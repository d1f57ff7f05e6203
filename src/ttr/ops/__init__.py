"""Sequence ops: each solves its regression problem in a chunk (training) and a recurrent (decoding) form."""

from .gd import linear_attention
from .minibatch import MiniBatchState, titans, ttt_linear, ttt_mlp
from .newton import mesa
from .sgd import delta_product, delta_rule, longhorn

__all__ = ["MiniBatchState", "delta_product", "delta_rule", "linear_attention", "longhorn", "mesa", "titans", "ttt_linear", "ttt_mlp"]
