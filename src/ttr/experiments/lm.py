"""`ttr lm`: small byte-level language models, one per memory, under the same budget, on a local corpus.

Every run trains ttr.models.LanguageModel with the library's one training loop (ttr.train) on the same windows
of the same corpus (ttr.tasks.text: the Python standard library's sources unless told otherwise), for the same
number of tokens, at parameter counts within 10 % of each other (checked before any training). A memory is a
preset name, or a layer pattern "a/b" repeated over the layers (a hybrid: "gated_deltanet/softmax_attention"
alternates them). Results: validation loss, bits per byte, training tokens/s, the loss curves.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .._files import write_atomically
from ..models import LanguageModel, LMConfig
from ..tasks.text import VOCAB_SIZE, Windows, load_corpus
from ..train import TrainConfig, train, world

BUDGET_SPREAD = 0.10  # parameter counts of the compared models within 10 % of the largest


@dataclass(frozen=True)
class LMSweep:
    memories: tuple[str, ...]
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 200
    lr: float = 3e-3
    evals: int = 6                 # evaluations over the run (and checkpoints)
    val_windows: int = 64          # held-out windows evaluated (seq_len bytes each)
    corpus: str | None = None      # a text file or folder; None: the Python standard library's sources
    max_bytes: int | None = 8_000_000
    seed: int = 0

    @property
    def tokens(self) -> int:
        """Training tokens of every run."""
        return self.steps * self.batch_size * self.seq_len

    def model_config(self, memory: str) -> LMConfig:
        return LMConfig(vocab_size=VOCAB_SIZE, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                        memory=layer_pattern(memory, self.n_layers))

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=0.1, min_lr=0.1,
                           eval_every=max(1, math.ceil(self.steps / self.evals)), seed=self.seed)


SWEEPS = {
    # a 2-core CPU in a few minutes (two runs at a time, one thread each): 2-layer models of ~0.5M parameters,
    # 600k bytes each
    "cpu": LMSweep(memories=("softmax_attention", "gla", "gated_deltanet", "mesanet",
                             "gated_deltanet/softmax_attention")),
    # a GPU: 8 layers, d_model 512 (~30M parameters), 100M bytes each, on the whole standard library
    "gpu": LMSweep(memories=("softmax_attention", "gla", "gated_deltanet", "mesanet", "ttt_linear",
                             "gated_deltanet/gated_deltanet/gated_deltanet/softmax_attention"),
                   d_model=512, n_layers=8, n_heads=8, seq_len=1024, batch_size=32, steps=3000, lr=1e-3, evals=15,
                   val_windows=512, max_bytes=None),
}


def layer_pattern(memory: str, n_layers: int) -> tuple[str, ...]:
    """"a/b" -> (a, b, a, b, ...) over n_layers; a preset name -> it on every layer."""
    parts = memory.split("/")
    return tuple(parts[i % len(parts)] for i in range(n_layers))


def check_budget(sweep: LMSweep) -> dict[str, int]:
    """Parameter count of every memory's model; a ValueError when they spread beyond BUDGET_SPREAD."""
    counts = {m: LanguageModel(sweep.model_config(m)).num_parameters() for m in sweep.memories}
    largest = max(counts.values())
    off = {m: c for m, c in counts.items() if c < (1 - BUDGET_SPREAD) * largest}
    if off:
        raise ValueError(f"parameter counts differ by more than {BUDGET_SPREAD:.0%} of the largest ({largest}): "
                         + ", ".join(f"{m} {c}" for m, c in off.items()))
    return counts


def data(sweep: LMSweep) -> tuple[Windows, Windows, dict]:
    corpus = load_corpus(sweep.corpus, sweep.max_bytes)
    if len(corpus.val) < sweep.seq_len + 1:
        raise ValueError(f"the held-out text of corpus {corpus.name!r} holds {len(corpus.val)} bytes, fewer than "
                         f"seq_len + 1 = {sweep.seq_len + 1}: use a larger corpus or a shorter --seq-len")
    val = Windows(corpus.val[: sweep.val_windows * sweep.seq_len + 1], sweep.seq_len)
    info = {"corpus": corpus.name, "train_bytes": len(corpus.train), "val_bytes": len(val) * sweep.seq_len,
            "train_files": corpus.train_files, "val_files": corpus.val_files}
    return Windows(corpus.train, sweep.seq_len), val, info


def run_key(memory: str) -> str:
    return memory.replace("/", "+")


def train_one(sweep: LMSweep, memory: str, out: Path, device: str = "cpu", report=None, threads: int = 1) -> dict:
    """One memory's run: its row of results. report (a queue, or None) receives (memory, step, training loss)
    every few steps for the caller's progress bar. Under torch.distributed every process calls it alike."""
    torch.set_num_threads(threads)
    train_set, val_set, info = data(sweep)
    torch.manual_seed(sweep.seed)
    model = LanguageModel(sweep.model_config(memory)).to(device)
    key = run_key(memory)

    def progress(step: int, metrics: dict) -> None:
        if report is not None and (step % 5 == 0 or step == sweep.steps):
            report.put((key, step, f"{metrics['loss'] / math.log(2):.3f} bits/byte"))

    identity = {**asdict(sweep), "memories": None, "memory": memory}  # what the checkpoint must come from
    result = train(model, train_set, val_set, sweep.train_config(), checkpoint=out / "checkpoints" / f"{key}.pt",
                   run=json.loads(json.dumps(identity)), progress=progress)
    final = result["final"]
    tokens = result["steps"] * sweep.batch_size * sweep.seq_len
    return {"memory": memory, "parameters": model.num_parameters(), "tokens": tokens,
            "val_loss": final["test_loss"], "bits_per_byte": final["test_loss"] / math.log(2),
            "val_accuracy": final["test_accuracy"], "tokens_per_s": tokens / max(result["seconds"], 1e-9),
            "processes": world()[1], "history": result["history"], **info}


def save(out: Path, sweep_name: str, sweep: LMSweep, rows: list[dict]) -> list[Path]:
    """results.json (every run with its curve), results.csv (one line per run) and lm_loss.png."""
    out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"sweep": sweep_name, "config": asdict(sweep), "rows": rows}, indent=1)
    write_atomically(out / "results.json", lambda f: f.write_text(payload))
    columns = ["memory", "parameters", "tokens", "val_loss", "bits_per_byte", "val_accuracy", "tokens_per_s",
               "processes"]
    csv = ",".join(columns) + "\n" + "".join(",".join(str(r[c]) for c in columns) + "\n" for r in rows)
    write_atomically(out / "results.csv", lambda f: f.write_text(csv))
    return [out / "results.json", out / "results.csv"] + ([_plot(out, sweep, rows)] if rows else [])


def _plot(out: Path, sweep: LMSweep, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    tokens_per_step = sweep.batch_size * sweep.seq_len
    for i, r in enumerate(sorted(rows, key=lambda r: r["val_loss"])):
        steps = [h["step"] * tokens_per_step / 1e6 for h in r["history"]]
        color = plt.cm.tab10(i % 10)
        for ax, which in zip(axes, ("train_loss", "test_loss")):
            ax.plot(steps, [h[which] / math.log(2) for h in r["history"]], "-o", ms=3, color=color,
                    label=f"{r['memory']} ({r['bits_per_byte']:.3f})")
    for ax, title in zip(axes, ("training (mean since the last evaluation)", "held-out files")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training bytes (millions)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per byte")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="final held-out bits/byte")
    fig.suptitle(f"Byte-level language models, {sweep.n_layers} layers, d_model {sweep.d_model}, "
                 f"{sweep.tokens / 1e6:.2g}M training bytes each")
    fig.tight_layout()
    path = out / "lm_loss.png"
    write_atomically(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return path


def overrides(sweep: LMSweep, **changes) -> LMSweep:
    """The sweep with the given fields changed (None: unchanged)."""
    return replace(sweep, **{k: v for k, v in changes.items() if v is not None})
