"""One training loop for the library: token classification with ignored positions (MQAR's labels, a language
model's shifted tokens).

AdamW with linear warm-up and cosine decay to `min_lr` x lr, gradient clipping, evaluation every `eval_every`
steps, an early stop once the evaluation accuracy reaches `target`, and a checkpoint at every evaluation
(written whole, see ttr._files) that `train(..., checkpoint=path)` resumes from: an interrupted run continues at
the step it had saved and ends as the uninterrupted run would (same batches, same optimizer state), a finished
one returns its result without training again.

Batches are a function of (seed, step) alone: step s takes the examples at positions s * B .. (s + 1) * B of an
epoch's permutation, seeded by (seed, epoch). That is what makes resuming exact, and data parallelism a slice
of it: under torch.distributed (torchrun), process r of W takes every W-th example of the same global batch and
its loss is its share of the global batch's mean (its summed loss over the global count of labelled tokens, times
W, since DistributedDataParallel averages gradients), so W processes take the steps one process would, up to
the order of float additions. A checkpoint is written once (by process 0), holds nothing that depends on W, and
resumes under any number of processes.

The data is (inputs, labels) tensors, or any dataset whose `len()` counts examples and whose `[index]` (a tensor of
example numbers) returns (inputs, labels) for them (a language model's windows over a corpus: ttr.tasks.text).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_ints, is_number
from ._files import write_atomically

IGNORE = -100  # the label of a position that is not scored (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1        # fraction of the steps
    min_lr: float = 0.0        # the cosine's floor, as a fraction of lr
    grad_clip: float = 1.0
    eval_every: int = 100
    target: float | None = None  # stop once the evaluation accuracy reaches it
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(self, ("steps", "batch_size", "eval_every"))
        for name, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("warmup", 0.0, 1.0),
                             ("min_lr", 0.0, 1.0), ("grad_clip", 0.0, math.inf)):
            value = getattr(self, name)
            if not (is_number(value) and lo <= value <= hi):
                raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): linear warm-up, then cosine decay to min_lr * lr."""
        warm = int(self.warmup * self.steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.lr * (self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """The examples step `step` trains on: a function of (seed, step) only (module docstring)."""
    first = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, at = divmod(first + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[at:at + batch_size - len(out)].tolist())
    return torch.tensor(out)


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]: ...


class Pairs:
    """(inputs, labels) tensors as a Dataset."""

    def __init__(self, inputs: Tensor, labels: Tensor) -> None:
        if inputs.shape[:1] != labels.shape[:1]:
            raise ValueError(f"inputs and labels must hold the same number of examples, got {inputs.shape[0]} "
                             f"and {labels.shape[0]}")
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.labels[index]


def _dataset(data: Dataset | tuple[Tensor, Tensor]) -> Dataset:
    return Pairs(*data) if isinstance(data, tuple) else data


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(t: Tensor) -> Tensor:
    """The sum over processes (t itself in one process)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def token_loss(model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy summed over the labelled positions: (summed loss, correct predictions, labelled positions)."""
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        scored = labels != IGNORE
        correct = (logits.argmax(-1) == labels) & scored
    return loss, correct.sum(), scored.sum()


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | tuple[Tensor, Tensor], batch_size: int = 256) -> dict[str, float]:
    """Mean loss and accuracy over the labelled positions of a held-out set (under torch.distributed each process
    evaluates its share and the sums are exchanged)."""
    data = _dataset(data)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, size = world()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, scored
    for i in range(rank * batch_size, len(data), size * batch_size):
        x, y = data[torch.arange(i, min(i + batch_size, len(data)))]
        loss, c, s = token_loss(model, x.to(device), y.to(device))
        sums += torch.stack([loss.double(), c.double(), s.double()])
    loss, correct, scored = _all_sum(sums).tolist()
    model.train(was_training)
    return {"loss": loss / max(scored, 1), "accuracy": correct / max(scored, 1)}


def train(model: nn.Module, train_set: Dataset | tuple[Tensor, Tensor], test_set: Dataset | tuple[Tensor, Tensor],
          cfg: TrainConfig, *, checkpoint: Path | None = None, run: dict | None = None,
          progress: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` (token ids [B, T] -> logits [B, T, V]) on train_set and evaluate on test_set (datasets, or
    (inputs, labels) tensors). Returns {"history": [{step, lr, train_loss, test_loss, test_accuracy}], "final": the
    last evaluation, "best_accuracy", "steps": steps taken, "stopped_early", "seconds": time in training steps,
    evaluations excluded}. progress(step, latest metrics) is called after every step. `run` (JSON data: the
    model's and the data's settings) is saved with the checkpoint, which resumes only a run with the same `run`
    and cfg. Under torch.distributed (module docstring) every process calls train with the same arguments."""
    device = next(model.parameters()).device
    data, test_set = _dataset(train_set), _dataset(test_set)
    if len(data) == 0:
        raise ValueError("train_set holds no examples")
    rank, size = world()
    if cfg.batch_size % size:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({size})")
    net = nn.parallel.DistributedDataParallel(model) if size > 1 else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]  # biases, norms, gate constants: no weight decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    state = {"step": 0, "history": [], "done": False, "seconds": 0.0, "stopped_early": False}
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        for key, mine, what in (("config", asdict(cfg), "training configuration"), ("run", run, "model or data")):
            if saved.get(key) != mine:
                raise ValueError(f"checkpoint {str(checkpoint)!r} was written with another {what}: remove it or "
                                 "train with the same settings")
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit this model: "
                             f"{str(exc).splitlines()[0]}") from None
        state = saved["state"]
    if state["done"]:
        return _result(state)

    def save() -> None:
        if checkpoint is not None and rank == 0:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            payload = {"config": asdict(cfg), "run": run, "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "state": state}
            write_atomically(checkpoint, lambda f: torch.save(payload, f))
        if size > 1:
            dist.barrier()  # no process runs ahead of a checkpoint it might be resumed from

    model.train()
    latest: dict = state["history"][-1] if state["history"] else {}
    running: list[Tensor] = []
    while state["step"] < cfg.steps:
        start = time.perf_counter()
        step = state["step"]
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data[batch_indices(len(data), cfg.batch_size, cfg.seed, step)[rank::size]]
        x, y = x.to(device), y.to(device)
        scored = _all_sum((y != IGNORE).sum().double())
        loss_sum, _, _ = token_loss(net, x, y)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (size / scored.clamp_min(1))).backward()
        loss = _all_sum(loss_sum.detach().double()) / scored.clamp_min(1)  # the global batch's mean
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"the training loss is not finite at step {step} (lr {lr:.3g}): lower lr")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        running.append(loss)
        state["step"] = step + 1
        state["seconds"] += time.perf_counter() - start
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            test = evaluate(model, test_set)
            latest = {"step": state["step"], "lr": lr, "train_loss": float(torch.stack(running).mean()),
                      "test_loss": test["loss"], "test_accuracy": test["accuracy"]}
            state["history"].append(latest)
            running = []
            if cfg.target is not None and test["accuracy"] >= cfg.target:
                state["stopped_early"] = state["step"] < cfg.steps
                state["done"] = True
            state["done"] = state["done"] or state["step"] == cfg.steps
            save()
        if progress is not None:
            progress(state["step"], {"loss": float(loss), **latest})
        if state["done"]:
            break
    return _result(state)


def _result(state: dict) -> dict:
    history = state["history"]
    return {"history": history, "final": history[-1] if history else {},
            "best_accuracy": max((h["test_accuracy"] for h in history), default=0.0), "steps": state["step"],
            "stopped_early": state["stopped_early"], "seconds": state["seconds"]}
