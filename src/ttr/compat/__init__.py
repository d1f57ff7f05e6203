"""Other libraries' op APIs on ttr's ops, so code written against them runs on any device.

fla: flash-linear-attention's `fla.ops` (names, signatures, returns, defaults) on ttr's pure-PyTorch ops.
"""

from . import fla

__all__ = ["fla"]
