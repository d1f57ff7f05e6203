"""Writing results so that an interruption never leaves a half-written file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """write(partial) writes the whole file to a sibling, which then replaces path in one step (a rename). The
    sibling is this process's own: two processes writing one path never share a partial file."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(partial)
    partial.replace(path)
    return path
