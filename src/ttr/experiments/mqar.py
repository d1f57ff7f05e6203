"""Multi-query associative recall with TTR layers: the model, and one training run of it.

The model (Zoology's setting, ttr.models.LanguageModel): token embedding, N blocks x + layer(norm(x)) of a
TTRLayer (any preset or Recipe) with or without its short convolution, each optionally followed by
x + mlp(norm(x)), a final norm and a linear head. No positional embedding: the short convolution is what tells a token its neighbour, and the claim under
test is that with it one layer suffices (k_t from x_{t-1} and v_t from x_t make the bigram association).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .._files import write_atomically
from ..models import LanguageModel, LMConfig
from ..recipe import PRESETS, Recipe
from ..tasks.mqar import IGNORE, MQARConfig, mqar, train_test
from ..train import TrainConfig, evaluate, train


# Scalar gates start remembering 100 to 10^4 tokens, not Mamba-2's 1 to 1000 (ttr.layers.gates.DT_RANGE): recall
# needs the pairs held until their queries, and the gate learns to remember slowly, its gradient in dt_bias being
# about dt. Measured at T = 64, 8 pairs, vocab 256, d_model 64, 800 steps: Mamba-2 0.29 -> 0.84, Gated DeltaNet
# 0.91 -> 0.98 (both with their convolution).
MQAR_DT_RANGE = (1e-4, 1e-3)


def mqar_model(vocab_size: int, d_model: int, memory: str | Recipe, *, n_layers: int = 1, head_dim: int = 16,
               conv: bool = True, mlp: bool = False, chunk_size: int = 64,
               dt_range: tuple[float, float] = MQAR_DT_RANGE) -> LanguageModel:
    """The language model of ttr.models in Zoology's setting: heads of head_dim, an untied head, no MLP unless
    asked for (SwiGLU), the short convolution on or off."""
    if d_model % head_dim:
        raise ValueError(f"head_dim {head_dim} must divide d_model {d_model}")
    return LanguageModel(LMConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                                  n_heads=d_model // head_dim, memory=memory, conv_size=4 if conv else 0,
                                  mlp_width=None if mlp else 0, tie_embeddings=False, chunk_size=chunk_size,
                                  dt_range=dt_range))


# ---------------------------------------------------------------------------------------------------------
# the sweep: memories x convolution x d_model x (seq_len, pairs) x learning rate, best learning rate per cell


@dataclass(frozen=True)
class Sweep:
    memories: tuple[str, ...]
    no_conv: tuple[str, ...]            # memories also trained without their short convolution (the control)
    d_models: tuple[int, ...]
    settings: tuple[tuple[int, int], ...]  # (seq_len, num_kv_pairs)
    lrs: tuple[float, ...]
    vocab_size: int = 64
    n_layers: int = 1
    steps: int = 400
    batch_size: int = 32
    n_train: int = 8192
    n_test: int = 512
    target: float = 0.99
    seed: int = 0
    mixed: bool = False                    # one model trained on every setting at once (Zoology), not one each
    test_settings: tuple[tuple[int, int], ...] = ()  # (seq_len, pairs) each trained model is also tested on
    mlp: bool = False                      # an MLP after each layer (Zoology's blocks)

    def runs(self) -> list[dict]:
        """One dict per training run, in the order they run. A mixed run's seq_len and kv_pairs are the largest
        of its settings."""
        settings = [max(self.settings)] if self.mixed else list(self.settings)
        return [{"memory": m, "conv": conv, "d_model": d, "seq_len": T, "kv_pairs": N, "lr": lr}
                for (T, N) in settings for d in self.d_models for m in self.memories
                for conv in ((True, False) if m in self.no_conv else (True,)) for lr in self.lrs]

    def data(self, run: dict) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """A run's training and test sets: its setting's, or every setting's (mixed), shorter sequences padded
        on the right with filler 0 and ignored labels."""
        settings = list(self.settings) if self.mixed else [(run["seq_len"], run["kv_pairs"])]
        parts = [train_test(MQARConfig(vocab_size=self.vocab_size, seq_len=T, num_kv_pairs=N),
                            self.n_train // len(settings), self.n_test // len(settings), seed=self.seed + i)
                 for i, (T, N) in enumerate(settings)]
        longest = max(T for T, _ in settings)
        return tuple(_padded([part[which] for part in parts], longest) for which in (0, 1))


# Every memory that reads only the past: a whole-sequence memory (SOFT, Skyformer: encoders) would see the answers
CAUSAL = tuple(name for name, p in PRESETS.items() if p.recipe.causal)
# One memory of each family without its convolution: the control of the claim that one layer needs it
_CONTROLS = ("linear_attention", "gated_deltanet", "mesa", "ttt_linear", "softmax_attention")
SWEEPS = {
    # a 2-core CPU in about 5 minutes: every preset at one setting where one layer with its convolution
    # solves MQAR, and the no-convolution controls; one learning rate, since a second doubles the time (measured
    # with (3e-3, 1e-2) at 300 steps: 9.5 minutes, and lower accuracy for most memories than 400 steps at 3e-3)
    "quick": Sweep(memories=CAUSAL, no_conv=_CONTROLS, d_models=(64,), settings=((32, 4),),
                   lrs=(3e-3,), test_settings=((32, 1), (32, 2), (32, 4), (32, 8))),
    # Zoology's grid, for a GPU: one model per cell trained on the mixture of (64, 4) .. (256, 64) and tested
    # up to (1024, 256); d_model 64-256, a log grid of learning rates, 2 layers with MLPs
    "zoology": Sweep(memories=CAUSAL, no_conv=_CONTROLS, d_models=(64, 128, 256),
                     settings=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64)),
                     lrs=tuple(10 ** x for x in (-3.5, -3.0, -2.5, -2.0)), vocab_size=8192, n_layers=2,
                     steps=4000, batch_size=64, n_train=100_000, n_test=3000, mixed=True, mlp=True,
                     test_settings=((64, 4), (128, 8), (256, 16), (256, 32), (256, 64), (512, 64), (512, 128),
                                    (1024, 128), (1024, 256))),
}


def run_key(run: dict) -> str:
    return (f"{run['memory']}-{'conv' if run['conv'] else 'noconv'}-d{run['d_model']}-T{run['seq_len']}"
            f"-N{run['kv_pairs']}-lr{run['lr']:.2g}")


def train_one(sweep: Sweep, run: dict, checkpoints: Path | None, device: str = "cpu", report=None) -> dict:
    """One training run of the sweep on `device`: its row of results. report (a queue, or None) receives
    (run key, step, training loss and latest test accuracy as text) every 10 steps, for the caller's progress
    bar."""
    torch.set_num_threads(1)  # runs go in parallel, one per core
    train_set, test_set = sweep.data(run)
    torch.manual_seed(sweep.seed)
    model = mqar_model(sweep.vocab_size, run["d_model"], run["memory"], n_layers=sweep.n_layers,
                       conv=run["conv"], mlp=sweep.mlp).to(device)
    train_cfg = TrainConfig(steps=sweep.steps, batch_size=sweep.batch_size, lr=run["lr"],
                            eval_every=max(1, sweep.steps // 8), target=sweep.target, seed=sweep.seed)
    checkpoint = None if checkpoints is None else checkpoints / f"{run_key(run)}.pt"
    key = run_key(run)

    def progress(step: int, metrics: dict) -> None:
        if report is not None and step % 10 == 0:
            accuracy = metrics.get("test_accuracy")
            report.put((key, step, f"loss {metrics['loss']:.2f} acc {'-' if accuracy is None else f'{accuracy:.2f}'}"))

    sizes = {"state_floats": model.state_floats(run["seq_len"]),
             "parameters": model.num_parameters()}
    try:
        identity = {**asdict(sweep), "memories": None, "no_conv": None, "lrs": None, **run}
        result = train(model, train_set, test_set, train_cfg, checkpoint=checkpoint,
                       run=json.loads(json.dumps(identity)), progress=progress)
    except ValueError as exc:  # the run diverged (its loss, or an op's answer, not finite): a result of the sweep
        return {**run, "accuracy": 0.0, "final_accuracy": 0.0, "steps": 0, "seconds": 0.0, **sizes,
                "error": str(exc).replace(",", ";")}
    row = {**run, "accuracy": result["best_accuracy"],
           "final_accuracy": result["final"].get("test_accuracy", 0.0), "steps": result["steps"],
           "seconds": round(result["seconds"], 1), **sizes}
    if sweep.test_settings:  # the trained model on other lengths and pair counts (a mixed run: their mean)
        tests = {}
        for i, (T, N) in enumerate(sweep.test_settings):
            x, y = mqar(MQARConfig(vocab_size=sweep.vocab_size, seq_len=T, num_kv_pairs=N), sweep.n_test,
                        seed=sweep.seed + 7_777_777 + i)
            tests[f"{T}/{N}"] = evaluate(model, (x, y))["accuracy"]
        row["tests"] = tests
        if sweep.mixed:
            row["accuracy"] = sum(tests.values()) / len(tests)
    return row


def _padded(sets: list[tuple[Tensor, Tensor]], length: int) -> tuple[Tensor, Tensor]:
    """Sets of (inputs, labels) of various lengths as one, padded on the right to `length`."""
    pad = [(F.pad(x, (0, length - x.shape[1])), F.pad(y, (0, length - y.shape[1]), value=IGNORE)) for x, y in sets]
    return torch.cat([x for x, _ in pad]), torch.cat([y for _, y in pad])


def best_per_cell(rows: list[dict]) -> list[dict]:
    """The best learning rate's row for every (memory, conv, d_model, seq_len, kv_pairs)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        cell = (r["memory"], r["conv"], r["d_model"], r["seq_len"], r["kv_pairs"])
        if cell not in best or r["accuracy"] > best[cell]["accuracy"]:
            best[cell] = r
    return list(best.values())


def save(out: Path, sweep_name: str, sweep: Sweep, rows: list[dict]) -> list[Path]:
    """results.json and results.csv (every run), and the plots of the best rows."""
    out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"sweep": sweep_name, "config": asdict(sweep), "rows": rows}, indent=1)
    write_atomically(out / "results.json", lambda f: f.write_text(payload))
    flat = [{**{k: v for k, v in r.items() if k != "tests"}, **{f"test {s}": a for s, a in r.get("tests", {}).items()}}
            for r in rows]                                               # a test setting per column
    columns = list(dict.fromkeys(c for r in flat for c in r))
    csv = ",".join(columns) + "\n" + "".join(",".join(str(r.get(c, "")) for c in columns) + "\n" for r in flat)
    write_atomically(out / "results.csv", lambda f: f.write_text(csv))
    return [out / "results.json", out / "results.csv"] + (_plots(out, best_per_cell(rows)) if rows else [])


_FAMILIES = {"linear_attention": "linear attention, its gates and feature maps",
             "mlstm": "linear attention, its gates and feature maps",
             "delta_rule": "online learners (delta rules)", "longhorn": "online learners (delta rules)",
             "delta_product": "online learners (delta rules)", "ttt_linear": "mini-batch learners (TTT, Titans)",
             "ttt_mlp": "mini-batch learners (TTT, Titans)", "titans": "mini-batch learners (TTT, Titans)",
             "mesa": "exact least squares (mesa)", "local_polynomial_attention": "caches (attention, kernels)",
             "kernel_regression": "caches (attention, kernels)"}


def _family(memory: str) -> str:
    """The panel a memory is drawn in: the op that solves its regression."""
    return _FAMILIES.get(PRESETS[memory].recipe.op_name, "other")


def _pair_curves(best: list[dict]) -> dict[str, dict[int, float]]:
    """Per memory (with its convolution), accuracy against pairs: from its test settings where it was tested on
    several (mean over lengths with the same pairs), else over the settings it was trained on; the best
    d_model and learning rate for each."""
    curves: dict[str, dict[int, float]] = {}
    for r in best:
        if not r["conv"]:
            continue
        mine = curves.setdefault(r["memory"], {})
        if "tests" in r:
            by_pairs: dict[int, list[float]] = {}
            for setting, acc in r["tests"].items():
                by_pairs.setdefault(int(setting.split("/")[1]), []).append(acc)
            points = {n: sum(a) / len(a) for n, a in by_pairs.items()}
        else:
            points = {r["kv_pairs"]: r["accuracy"]}
        for n, acc in points.items():
            mine[n] = max(mine.get(n, 0.0), acc)
    return curves


def _finish(fig, axes, used: int, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label a grid of family panels (the unused ones hidden), save it whole as PNG and close it."""
    import matplotlib.pyplot as plt

    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return path


def _plots(out: Path, best: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    memories = sorted({r["memory"] for r in best})
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(memories)}
    # accuracy against the memory's state size (Zoology's trade-off plot): one panel per optimizer family, one
    # line per memory through its d_models, named at its end, x for the runs without the convolution
    families: dict[str, list[str]] = {}
    for m in memories:
        families.setdefault(_family(m), []).append(m)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), sharex=True, sharey=True)
    for ax, (family, names) in zip(axes.flat, sorted(families.items())):
        for i, m in enumerate(names):
            color = plt.cm.tab10(i % 10)
            conv = sorted((r for r in best if r["memory"] == m and r["conv"]), key=lambda r: r["state_floats"])
            plain = [r for r in best if r["memory"] == m and not r["conv"]]
            if conv:
                ax.plot([r["state_floats"] for r in conv], [r["accuracy"] for r in conv], "-o", color=color, ms=5)
                ax.annotate(m, (conv[-1]["state_floats"], conv[-1]["accuracy"]), textcoords="offset points",
                            xytext=(8, -9 * i), fontsize=8, color=color)  # stacked: tied points stay apart
            if plain:
                ax.scatter([r["state_floats"] for r in plain], [r["accuracy"] for r in plain], marker="x", s=50,
                           color=color)
        ax.set_title(family, fontsize=10)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3)
    paths.append(_finish(fig, axes, len(families), "floats in one layer's memory state after the sequence",
                         "MQAR accuracy (best learning rate)",
                         "Recall against state size (o: with the short convolution, x: without)",
                         out / "mqar_state_size.png"))
    curves = _pair_curves(best)
    if any(len(points) > 1 for points in curves.values()):  # accuracy against pairs, a panel per family
        fig, axes = plt.subplots(2, 3, figsize=(16, 9), sharex=True, sharey=True)
        for ax, (family, names) in zip(axes.flat, sorted(families.items())):
            for i, m in enumerate(n for n in names if n in curves):
                xs, ys = zip(*sorted(curves[m].items()))
                ax.plot(xs, ys, "-o", color=plt.cm.tab10(i % 10), ms=4, label=m)
            ax.set_title(family, fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
        paths.append(_finish(fig, axes, len(families), "key-value pairs",
                             "MQAR accuracy (best d_model and learning rate)",
                             "Recall against the number of pairs (with the short convolution)", out / "mqar_pairs.png"))
    return paths
