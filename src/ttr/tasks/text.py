"""Byte-level text corpora for language models, with a held-out split by file.

The default corpus exists on every machine without a network: the Python standard library's own sources (its
.py files, sorted by path). A user's text file or folder works the same way. Each file is held out (validation)
or trained on as a whole, chosen by a hash of its path, so no file is split across the two; a single file is
split at 95 % of its bytes, and a folder of few files holds out at least one. Files are joined with a NUL byte
between them (a document boundary that text never holds), and the model reads bytes: vocab_size 256, one token
per byte, so the loss in bits per token is bits per byte.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256
SEPARATOR = 0
HELD_OUT = 0.05          # the share of files (or, for one file, of bytes) held out
_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".csv", ".tex", ".html", ".js", ".toml",
                  ".yaml", ".yml", ".cfg", ".ini", ""}


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class Corpus:
    name: str
    train: Tensor          # uint8 [n_train]
    val: Tensor            # uint8 [n_val]
    train_files: int
    val_files: int


def _share(relative: str) -> float:
    """A file's place in [0, 1), from its path alone: the files below HELD_OUT are held out."""
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "little") / 2 ** 64


def _files(root: Path) -> list[Path]:
    """The text files under root: the default corpus's .py files, a user folder's text-like files without NUL
    bytes (binaries skipped), sorted so the corpus is the same on every run."""
    suffixes = {".py"} if root == stdlib_path() else _TEXT_SUFFIXES
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.suffix.lower() in suffixes and "site-packages" not in \
                path.relative_to(root).parts:
            out.append(path)
    return out


def load_corpus(path: str | Path | None = None, max_bytes: int | None = None) -> Corpus:
    """The corpus at `path` (a text file or a folder; None: the Python standard library's sources). A folder's
    files are read in sorted order until max_bytes is reached (the last one whole); a file's first max_bytes.
    A folder of few files holds out at least one (the one first in hash order) and trains on the rest."""
    root = stdlib_path() if path is None else Path(path)
    if not str(path if path is not None else root).strip() or not root.exists():
        raise ValueError(f"corpus path {str(path)!r} does not exist")
    documents: list[tuple[str, bytes]] = []
    if root.is_file():
        documents.append((root.name, root.read_bytes()[:max_bytes]))
        if SEPARATOR in documents[0][1]:
            raise ValueError(f"corpus file {str(root)!r} holds NUL bytes: not a text file")
    else:
        read = 0
        for file in _files(root):
            try:
                data = file.read_bytes()
            except OSError:
                continue  # unreadable: not part of the corpus
            if data and SEPARATOR not in data:
                documents.append((str(file.relative_to(root)), data))
                read += len(data)
                if max_bytes is not None and read >= max_bytes:
                    break
    if len(documents) == 1:  # one document: its last HELD_OUT of bytes is held out
        data = documents[0][1]
        cut = int(len(data) * (1 - HELD_OUT))
        train, val, files = data[:cut], data[cut:], (1, 1)
    elif not documents:
        raise ValueError(f"corpus {str(root)!r} holds no text files")
    else:
        shares = [_share(name) for name, _ in documents]
        held = [x < HELD_OUT for x in shares]
        if not any(held):
            held[shares.index(min(shares))] = True
        sep = bytes([SEPARATOR])
        train = sep.join(d for (_, d), h in zip(documents, held) if not h)
        val = sep.join(d for (_, d), h in zip(documents, held) if h)
        files = (held.count(False), held.count(True))
    if min(len(train), len(val)) < 2:
        raise ValueError(f"corpus {str(root)!r} is too small to split into training and held-out text "
                         f"({len(train)} and {len(val)} bytes)")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus("python stdlib" if path is None else str(root), as_tensor(train), as_tensor(val), *files)


class Windows:
    """A byte stream as examples of seq_len tokens: example i reads bytes [i L, (i + 1) L] and predicts each next
    byte (inputs bytes i L .. i L + L - 1, labels one further). A training Dataset (ttr.train)."""

    def __init__(self, data: Tensor, seq_len: int) -> None:
        if len(data) < seq_len + 1:
            raise ValueError(f"the text holds {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        rows = index.long()[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        window = self.data[rows].long()
        return window[:, :-1], window[:, 1:]
