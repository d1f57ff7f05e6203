"""Synthetic data for the experiments."""

from .switching import switching_keys

__all__ = ["switching_keys"]
