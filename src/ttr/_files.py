"""Writing results so that an interruption never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """write(partial) writes the whole file to a sibling, which then replaces path in one step (a rename)."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)
    return path
