"""Sequence ops: each solves its regression problem in a chunk (training) and a recurrent (decoding) form."""

from .gd import linear_attention
from .kernel import kernel_regression
from .local import local_polynomial_attention
from .minibatch import MiniBatchState, titans, ttt_linear, ttt_mlp
from .mlstm import mlstm
from .newton import mesa
from .sgd import delta_product, delta_rule, longhorn

__all__ = ["MiniBatchState", "delta_product", "delta_rule", "kernel_regression", "linear_attention",
           "local_polynomial_attention", "longhorn", "mesa", "mlstm", "titans", "ttt_linear", "ttt_mlp"]
