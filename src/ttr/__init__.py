"""ttr: sequence layers with associative memory, derived as test-time regression.

Every layer is three ingredients, the weights of each association, the regressor's function class,
and the optimizer; see `Recipe` and the named systems in `PRESETS` (`ttr zoo` prints them).
"""

from . import ops, oracle
from .features import FEATURE_MAPS, FeatureMap, PositiveRandomFeatures
from .layers import LayerState, ShortConv, TTRLayer
from .oracle import BatchGD, Exact
from .recipe import (MLP, PRESETS, RKHS, Linear, LocalConstant, LocalPolynomial, MiniBatchGD, OnlineSGD, Preset, Recipe,
                     get_preset)
from .weights import FixedDecay, ScalarGate, Uniform, VectorGate

__version__ = "0.1.0"

__all__ = [
    "BatchGD", "Exact", "FEATURE_MAPS", "FeatureMap", "FixedDecay", "LayerState", "Linear", "LocalConstant",
    "LocalPolynomial", "MLP", "MiniBatchGD", "OnlineSGD", "PRESETS", "PositiveRandomFeatures", "Preset", "RKHS",
    "Recipe", "ScalarGate", "ShortConv",
    "TTRLayer", "Uniform", "VectorGate", "get_preset", "ops", "oracle",
]
