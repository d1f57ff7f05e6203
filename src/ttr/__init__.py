"""ttr: sequence layers with associative memory, derived as test-time regression.

Every layer is three ingredients, the weights of each association, the regressor's function class,
and the optimizer; see `Recipe` and the named systems in `PRESETS` (`ttr zoo` prints them).
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:
    from . import ops, oracle
    from ._checks import checks, set_checks
    from .features import (FEATURE_MAPS, FeatureMap, PositiveRandomFeatures, cosformer_features, feature_dim,
                           hedgehog_distillation_loss, make_feature_map)
    from .layers import LayerState, ShortConv, TTRLayer
    from .oracle import BatchGD, Exact
    from .recipe import (MLP, PRESETS, RKHS, Linear, LocalConstant, LocalPolynomial, MiniBatchGD, NormalizedGD,
                         OnlineSGD, Preset, Recipe, get_preset)
    from .weights import ComplexGate, EntryGate, FixedDecay, ScalarGate, Uniform, VectorGate

# Imported on first use, so that `ttr --help` answers without importing torch
_HOME = {
    "ops": None, "oracle": None,
    "checks": "_checks", "set_checks": "_checks",
    "FEATURE_MAPS": "features", "FeatureMap": "features", "PositiveRandomFeatures": "features",
    "cosformer_features": "features", "feature_dim": "features", "hedgehog_distillation_loss": "features",
    "make_feature_map": "features",
    "LayerState": "layers", "ShortConv": "layers", "TTRLayer": "layers",
    "BatchGD": "oracle", "Exact": "oracle",
    "MLP": "recipe", "PRESETS": "recipe", "RKHS": "recipe", "Linear": "recipe", "LocalConstant": "recipe",
    "LocalPolynomial": "recipe", "MiniBatchGD": "recipe", "NormalizedGD": "recipe", "OnlineSGD": "recipe",
    "Preset": "recipe",
    "Recipe": "recipe", "get_preset": "recipe",
    "ComplexGate": "weights", "EntryGate": "weights", "FixedDecay": "weights", "ScalarGate": "weights",
    "Uniform": "weights", "VectorGate": "weights",
}


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module 'ttr' has no attribute {name!r}")
    home = _HOME[name]
    value = _importlib.import_module(f".{home or name}", __name__)
    return value if home is None else getattr(value, name)


__version__ = "0.1.0"

__all__ = sorted(_HOME)


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
