"""Multi-query associative recall (MQAR), the protocol of Zoology (Arora et al., 2023).

A sequence of `seq_len` tokens opens with `num_kv_pairs` key-value pairs, k_1 v_1 k_2 v_2 ..., keys drawn
without replacement from the lower half of the vocabulary (1 .. V/2 - 1; 0 is the filler) and values from
the upper half (V/2 .. V - 1). The rest of the sequence holds one query per pair: key k_j again, at an even
offset 2 g_j of the rest, the offsets g_j drawn without replacement with probability proportional to
a g^(a - 1), g = 1 .. (seq_len - 2 N) / 2 (a power law: small a puts queries near the pairs). At a query
position the label is the paired value (the model predicts it as the next token); every other label is
IGNORE. The filler is 0, or random tokens from the whole vocabulary (`random_filler`, as Zoology's
`random_non_queries`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_positive_ints
from ..train import IGNORE  # the label of positions that are not queries



@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_filler: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(self, ("vocab_size", "seq_len", "num_kv_pairs"))
        if self.seq_len % 2:
            raise ValueError(f"seq_len must be even (pairs, then queries at even offsets), got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"4 * num_kv_pairs must be at most seq_len (the pairs take 2 N tokens and the N "
                             f"queries need N of the (seq_len - 2 N) / 2 even offsets), got num_kv_pairs "
                             f"{self.num_kv_pairs} and seq_len {self.seq_len}")
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"vocab_size {self.vocab_size} holds {max(0, self.vocab_size // 2 - 1)} keys (1 .. "
                             f"vocab_size / 2 - 1), fewer than num_kv_pairs {self.num_kv_pairs}")
        if not (isinstance(self.power_a, (int, float)) and 0 < self.power_a <= 1):
            raise ValueError(f"power_a must lie in (0, 1] (1: uniform offsets), got {self.power_a!r}")


def mqar(cfg: MQARConfig, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n examples: (inputs [n, seq_len] int64, labels [n, seq_len] int64, IGNORE but at the queries)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    N, L, V = cfg.num_kv_pairs, cfg.seq_len, cfg.vocab_size
    half = V // 2
    keys = 1 + torch.rand(n, half - 1, generator=gen).topk(N, dim=-1).indices  # without replacement per example
    values = half + torch.rand(n, V - half, generator=gen).topk(N, dim=-1).indices
    context = 2 * N
    space = (L - context) // 2
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = cfg.power_a * g ** (cfg.power_a - 1)
    gaps = torch.multinomial(p.expand(n, space), N, replacement=False, generator=gen) if n else \
        torch.zeros(0, N, dtype=torch.long)
    inputs = torch.zeros(n, L, dtype=torch.long)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    where = context + 2 * gaps                                               # the queries' positions
    labels = torch.full((n, L), IGNORE, dtype=torch.long)
    inputs.scatter_(1, where, keys)
    labels.scatter_(1, where, values)
    if cfg.random_filler:
        filler = inputs == 0
        inputs[filler] = torch.randint(V, (int(filler.sum()),), generator=gen)
    return inputs, labels


def train_test(cfg: MQARConfig, n_train: int, n_test: int, seed: int, test_cfg: MQARConfig | None = None
               ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Seeded train and test sets with no shared example: test examples that also occur in the training set
    are replaced by fresh draws. test_cfg (default cfg) may set other lengths and pair counts."""
    test_cfg = test_cfg or cfg
    if test_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"train and test must share the vocabulary, got {cfg.vocab_size} and {test_cfg.vocab_size}")
    train = mqar(cfg, n_train, seed)
    seen = {row.numpy().tobytes() for row in train[0]} if test_cfg.seq_len == cfg.seq_len else set()
    inputs, labels, draw = [], [], 0
    while sum(len(x) for x in inputs) < n_test:
        if draw == 100:
            raise ValueError(f"cannot draw {n_test} test examples outside the training set: the task has too "
                             "few distinct examples; raise vocab_size or seq_len")
        x, y = mqar(test_cfg, n_test, seed + 1_000_003 * (draw + 1))
        fresh = torch.tensor([row.numpy().tobytes() not in seen for row in x], dtype=torch.bool)
        inputs.append(x[fresh])
        labels.append(y[fresh])
        draw += 1
    return train, (torch.cat(inputs)[:n_test], torch.cat(labels)[:n_test])
