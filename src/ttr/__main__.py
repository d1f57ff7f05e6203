"""python -m ttr: the `ttr` command (what torchrun launches: torchrun --nproc_per_node N -m ttr lm ...)."""

import sys

from .cli import run

sys.exit(run())
