"""Sequence ops: each solves its regression problem in a chunk (training) and a recurrent (decoding) form."""

from .gd import linear_attention

__all__ = ["linear_attention"]
