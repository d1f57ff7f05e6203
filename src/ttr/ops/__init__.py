"""Sequence ops: each solves its regression problem in a chunk (training) and a recurrent (decoding) form."""

from .gd import linear_attention
from .sgd import delta_rule

__all__ = ["delta_rule", "linear_attention"]
