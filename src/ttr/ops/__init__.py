"""Sequence ops: each solves its regression problem in a chunk (training) and a recurrent (decoding) form."""

from .gd import linear_attention
from .generic import generic_recurrent
from .kernel import kernel_regression
from .local import local_polynomial_attention
from .minibatch import MiniBatchState, titans, ttt_linear, ttt_mlp
from .mlstm import mlstm
from .newton import mesa
from .nystrom import nystrom_error, skyformer, soft_attention
from .sgd import delta_product, delta_rule, longhorn

__all__ = ["MiniBatchState", "delta_product", "delta_rule", "generic_recurrent", "kernel_regression", "linear_attention",
           "local_polynomial_attention", "longhorn", "mesa", "mlstm", "nystrom_error", "skyformer", "soft_attention",
           "titans", "ttt_linear", "ttt_mlp"]
