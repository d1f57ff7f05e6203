"""The `ttr` command: zoo (the named systems), regress (the single-forward-pass experiment), bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._memory import freed_memory_kept, keep_freed_memory

console = Console()


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _at_least(low: int):
    """An argparse type: an int >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _writable(folder: Path) -> None:
    """Fail before any compute where the results could not be saved."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".ttr-write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write to the output folder {str(folder)!r}: {exc.strerror or exc}") from None


_OP_SHORT = {"linear_attention": "la", "delta_rule": "dr", "longhorn": "lh", "delta_product": "dp",
             "ttt_linear": "ttt", "ttt_mlp": "mlp", "titans": "tit", "mesa": "mesa", "softmax": "sm",
             "local_linear": "ll"}


def _short_row(name: str) -> str:
    """A bench row named "op gate" as the tables write it: "dr s"; SDPA as "sdpa"."""
    op, gate = name.split()
    return "sdpa" if op == "sdpa" else f"{_OP_SHORT.get(op, op)} {gate[0]}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x < 10 else f"{x:.0f}"


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)


def cmd_zoo(args: argparse.Namespace) -> None:
    from .recipe import PRESETS

    if getattr(args, "all", False):
        _zoo_all()
        return

    forms = sorted({f for p in PRESETS.values() for f in p.recipe.forms})
    table = Table(title=f"ttr zoo: named systems as test-time regression (forms: {', '.join(forms)})",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    rows = [(p.name, *p.recipe.describe().split(" | ")) for p in PRESETS.values()]
    for i, col in enumerate(("name", "weights", "function class", "optimizer")):
        longest_word = max(len(word) for row in rows for word in row[i].split())
        table.add_column(col, min_width=longest_word, no_wrap=i == 0)  # wraps between words only
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for p in PRESETS.values():
        console.print(f"[bold]{p.name}[/bold] (ops.{p.recipe.op_name}): {p.title} ({p.citation}); "
                      f"{p.parameterization}")


# cell codes of the fast ops in `ttr zoo --all`: the bench's short names, plus the ops the bench does not time
_ZOO_OP_SHORT = {**_OP_SHORT, "mlstm": "ml", "local_polynomial_attention": "lpa", "kernel_regression": "kr",
                 "soft_attention": "soft", "skyformer": "sky"}
# weights column headers: a letter per kind, then a mark per option that sets two weights of a kind apart
_WEIGHTS_SHORT = {"uniform": "U", "fixed": "F", "scalar": "S", "vector": "V", "complex": "C", "entry": "E"}


def _weights_short(w) -> str:
    head = _WEIGHTS_SHORT.get(w.kind, w.kind[:2])
    window, causal = getattr(w, "window", None), getattr(w, "causal", True)
    return (head + ("+i" if getattr(w, "input_gate", False) else "") + ("+u" if getattr(w, "bonus", False) else "")
            + ("f" if getattr(w, "fixed", False) else "") + (f"w{window}" if window is not None else "")
            + ("nc" if not causal else ""))


def _optimizer_short(opt) -> str:
    from .oracle import BatchGD, Exact
    from .recipe import MiniBatchGD, NormalizedGD, OnlineSGD

    if isinstance(opt, BatchGD):
        return f"GD {opt.steps}" + (f" lr{opt.lr:g}" if opt.lr != 1 else "")
    if isinstance(opt, Exact):
        return "exact" + (f" r{opt.ridge:g}" if opt.ridge else "")
    if isinstance(opt, NormalizedGD):
        return "norm GD"
    if isinstance(opt, OnlineSGD):
        return "SGD" + (" impl" if opt.step == "implicit" else "") + (f" {opt.steps_per_token}/t"
                                                                       if opt.steps_per_token > 1 else "")
    if isinstance(opt, MiniBatchGD):
        return f"MB {opt.batch_size}" + (" mom" if opt.momentum else "")
    return type(opt).__name__


def _zoo_all() -> None:
    """Every combination of ingredients (ttr.ops.generic.grid): one table per function class, optimizers down,
    weights across, in short codes so that each table fits 80 columns; the legends spell the codes out. Each cell
    is the fast op (a chunk form), R (the generic recurrent executor) or -n, reason n why it does not run."""
    from collections import Counter

    from .ops import generic
    from .recipe import _describe_optimizer

    grid = generic.grid()
    regressors = list(dict.fromkeys(r.regressor for r in grid))
    optimizers = list(dict.fromkeys(r.optimizer for r in grid))
    weights = list(dict.fromkeys(r.weights for r in grid))
    headers = [_weights_short(w) for w in weights]
    plans = {(r.weights, r.regressor, r.optimizer): generic.classify(r) for r in grid}
    reasons: dict[str, int] = {}
    ops_seen: dict[str, str] = {}  # code -> op name, for the legend
    cells: dict[tuple, tuple[str, str]] = {}  # (weights, regressor, optimizer) -> (code, style)
    for key in ((w, reg, opt) for reg in regressors for opt in optimizers for w in weights):  # in reading order
        plan = plans[key]
        if plan.kind == "chunk":
            name = plan.op.func.__name__
            code = _ZOO_OP_SHORT.get(name) or "".join(word[0] for word in name.split("_"))
            ops_seen.setdefault(code, name)
            cells[key] = (code, "green")
        elif plan.kind == "recurrent":
            cells[key] = ("R", "yellow")
        else:
            cells[key] = (f"-{reasons.setdefault(plan.label, len(reasons) + 1)}", "dim")
    # headers padded to the widest cell of any table, so that every table has the same columns
    width = max(len(text) for text in [*headers, *(code for code, _ in cells.values())])
    label_width = max(len(_optimizer_short(o)) for o in optimizers)
    for reg in regressors:
        # one space between columns: room for a dozen weights columns in 80
        table = Table(title=f"function class: {reg.describe()}", box=box.SIMPLE_HEAD, padding=(0, 0))
        table.add_column("optimizer".ljust(label_width), no_wrap=True)
        for head in headers:
            table.add_column(head.ljust(width), no_wrap=True)
        for opt in optimizers:
            table.add_row(_optimizer_short(opt), *(f"[{style}]{code}[/{style}]"
                                                   for code, style in (cells[w, reg, opt] for w in weights)))
        console.print(table)
    console.print("Weights: " + "; ".join(f"{h} = {w.describe()}" for h, w in zip(headers, weights)))
    spelled = {_optimizer_short(o): _describe_optimizer(o) for o in optimizers}
    console.print("Optimizers: " + "; ".join(f"{s} = {d}" for s, d in spelled.items() if s != d))
    console.print("Cells: a fast op with a chunk form (ttr.ops): " + ", ".join(c if c == n else f"{c} = {n}" for c, n in ops_seen.items())
                  + "; R = the generic recurrent executor (ttr.ops.generic, no chunk form); -n = it does not run, "
                  "for reason n:")
    for label, n in reasons.items():
        console.print(f"({n}) {label}")
    counts = Counter(p.kind for p in plans.values())
    console.print(f"{len(grid)} combinations: {counts['chunk']} with a chunk form (a fast op), {counts['recurrent']} "
                  f"run by the generic recurrent executor, {counts['undefined']} not a regression problem")


def cmd_regress(args: argparse.Namespace) -> None:
    from .experiments import regress
    from .recipe import PRESETS

    cfg = regress.RegressConfig(dim=args.dim, length=args.length, n_seq=args.sequences, seed=args.seed,
                                decay=args.decay, step=args.step, out=args.out)
    _writable(Path(cfg.out))
    with _progress() as bar:
        task = bar.add_task("memories", total=len(regress.causal_presets()))
        rows, curves = regress.run(cfg, progress=lambda: bar.advance(task))
    results, plot = regress.save(cfg, rows, curves)
    table = Table(title=f"Switching regression: d={cfg.dim}, T={cfg.length}, switch at {cfg.length // 4}, "
                        f"{cfg.n_seq} sequences", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    for col in ("memory", "mse before", "mse final", "1-cos before", "1-cos peak", "1-cos final", "recover"):
        table.add_column(col, justify="left" if col == "memory" else "right", no_wrap=col == "memory")
    for r in sorted(rows, key=lambda r: r.cos_final):
        table.add_row(r.memory, f"{r.mse_before:.3g}", f"{r.mse_final:.3g}", f"{r.cos_before:.3g}",
                      f"{r.cos_peak:.3g}", f"{r.cos_final:.3g}",
                      "never" if r.recovery_steps is None else str(r.recovery_steps))
    console.print(table)
    skipped = sorted(set(PRESETS) - set(regress.causal_presets()))
    if skipped:
        console.print(f"Not run: {', '.join(skipped)} (whole-sequence memories, encoders: no prefix to regress on).")
    console.print("mse: squared error; 1-cos: direction error. before: t in [T/8, T/4); final: the last quarter; "
                  "peak: the first T/8 after the switch; recover: steps after the switch until the direction "
                  "error (smoothed over 16), past its peak, is within 10% of its final level.")
    console.print(f"saved {plot} and {results}")


def cmd_capacity(args: argparse.Namespace) -> None:
    from .experiments import capacity

    cfg = capacity.CapacityConfig(dim=args.dim, trials=args.trials, seed=args.seed, out=args.out)
    _writable(Path(cfg.out))
    with _progress() as bar:
        task = bar.add_task("pair counts", total=capacity.steps(cfg))
        rows = capacity.run(cfg, progress=lambda: bar.advance(task))
    results, plot = capacity.save(cfg, rows)
    for kind in ("random", "orthonormal"):
        counts = sorted({r.pairs for r in rows if r.keys == kind})
        shown = capacity.headline(counts, cfg.dim)
        table = Table(title=f"Recall accuracy, {kind} unit keys, d={cfg.dim}, {cfg.trials} trials",
                      box=box.SIMPLE_HEAD, padding=(0, 1))
        table.add_column("memory \\ pairs N", no_wrap=True)
        for n in shown:
            table.add_column(str(n), justify="right")
        for memory in capacity.MEMORIES:
            acc = {r.pairs: r.accuracy for r in rows if r.keys == kind and r.memory == memory}
            table.add_row(memory, *(f"{acc[n]:.2f}" for n in shown))
        console.print(table)
    console.print(f"saved {plot}, {results} and capacity.csv")


def _in_pool(jobs: int, label: str, total: int, done: int, steps: int, runs: list[tuple], finished) -> None:
    """Train runs = [(fn, args)] in `jobs` spawned processes, fn(*args, report) each, with a bar per run in
    training fed by the (key, step, text) its report queue receives; finished(row) saves a finished run's row and
    returns (its key, a summary for the overall bar)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawned workers: a forked copy of a process whose torch already started its thread pools can hang
    context = multiprocessing.get_context("spawn")
    with _progress() as bar, ProcessPoolExecutor(jobs, mp_context=context) as pool, context.Manager() as manager:
        overall = bar.add_task(label, total=total, completed=done)
        live: dict[str, int] = {}
        reports = manager.Queue()
        pending = {pool.submit(fn, *args, reports) for fn, args in runs}
        while pending:
            ready, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            while not reports.empty():
                key, step, text = reports.get()
                if key not in live:
                    live[key] = bar.add_task(key, total=steps)
                bar.update(live[key], completed=step, description=f"{key} {text}")
            for future in ready:
                key, summary = finished(future.result())  # after every run: an interruption keeps what finished
                if key in live:
                    bar.remove_task(live.pop(key))
                bar.update(overall, advance=1, description=f"{label} (last: {key} {summary})")


def cmd_mqar(args: argparse.Namespace) -> None:
    from dataclasses import asdict, replace

    from .experiments import mqar
    from .recipe import PRESETS

    sweep = mqar.SWEEPS[args.preset]
    if args.memories != "all":
        chosen = tuple(args.memories.split(","))
        if len(set(chosen)) < len(chosen):
            raise ValueError(f"--memories names a memory twice: {args.memories!r}")
        unknown = [m for m in chosen if m not in PRESETS]
        if unknown:
            raise ValueError(f"--memories: unknown {', '.join(unknown)}; choose among {', '.join(PRESETS)}")
        whole = [m for m in chosen if m not in mqar.CAUSAL]
        if whole:
            raise ValueError(f"--memories: {', '.join(whole)} read the whole sequence (encoders) and would see the "
                             "answers; choose among the causal memories")
        sweep = replace(sweep, memories=chosen, no_conv=tuple(m for m in sweep.no_conv if m in chosen))
    if args.steps is not None:
        sweep = replace(sweep, steps=args.steps)
    device = _device(args.device)
    out = Path(args.out)
    _writable(out)
    rows = _finished_rows(out / "results.json", "mqar", args.preset, asdict(sweep))
    done = {mqar.run_key(r) for r in rows}
    todo = [r for r in sweep.runs() if mqar.run_key(r) not in done]

    def finished(row: dict) -> tuple[str, str]:
        rows.append(row)
        mqar.save(out, args.preset, sweep, rows)
        return mqar.run_key(row), f"{row['accuracy']:.2f}"

    _in_pool(args.jobs, f"mqar {args.preset} runs", len(sweep.runs()), len(done), sweep.steps,
             [(mqar.train_one, (sweep, run, out / "checkpoints", device)) for run in todo], finished)
    paths = mqar.save(out, args.preset, sweep, rows)
    best = sorted(mqar.best_per_cell(rows), key=lambda r: (-r["accuracy"], r["memory"]))
    table = Table(title=f"MQAR ({args.preset}): best accuracy per memory, {sweep.n_layers} layer(s), vocab "
                        f"{sweep.vocab_size}", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("memory", "conv", "d", "T/N", "acc", "lr", "state", "steps", "sec"):
        table.add_column(col, justify="left" if col == "memory" else "right", no_wrap=True)
    for r in best:
        table.add_row(r["memory"], "yes" if r["conv"] else "no", str(r["d_model"]), f"{r['seq_len']}/{r['kv_pairs']}",
                      f"{r['accuracy']:.3f}", f"{r['lr']:.0e}", str(r["state_floats"]), str(r["steps"]),
                      f"{r['seconds']:.0f}")
    console.print("T/N: sequence length / key-value pairs (a mixed sweep: the largest trained on, and acc the mean "
                  "over its test settings); state: floats in one layer's memory after T tokens")
    console.print(table)
    console.print(f"saved {', '.join(str(p) for p in paths)}")


def _finished_rows(path: Path, command: str, preset: str, config: dict) -> list[dict]:
    """The rows an earlier run of the same sweep finished (none without a file); another sweep's file is an
    error naming it, left as it was."""
    import json

    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
        same = saved["sweep"] == preset and saved["config"] == json.loads(json.dumps(config))
        rows = list(saved["rows"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as ttr {command} results ({type(exc).__name__}); move it away "
                         "or choose another --out") from None
    if not same:
        raise ValueError(f"{str(path)!r} holds another sweep's results; choose another --out or remove it")
    return rows


def cmd_lm(args: argparse.Namespace) -> None:
    import os
    from dataclasses import asdict

    from .experiments import lm
    from .recipe import PRESETS

    sweep = lm.SWEEPS[args.preset]
    memories = None
    if args.memories != "preset":
        memories = tuple(args.memories.split(","))
        if len(set(memories)) < len(memories):
            raise ValueError(f"--memories names a memory twice: {args.memories!r}")
        for m in memories:
            unknown = [part for part in m.split("/") if part not in PRESETS]
            if unknown:
                raise ValueError(f"--memories: unknown preset {unknown[0]!r} in {m!r}; choose among "
                                 f"{', '.join(PRESETS)} (a/b alternates two over the layers)")
            whole = [part for part in m.split("/") if not PRESETS[part].recipe.causal]
            if whole:
                raise ValueError(f"--memories: {whole[0]!r} in {m!r} reads the whole sequence (an encoder); a "
                                 "language model predicting the next token must not see it")
    sweep = lm.overrides(sweep, memories=memories, steps=args.steps, d_model=args.d_model, n_layers=args.layers,
                         n_heads=args.heads, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                         corpus=args.corpus, max_bytes=args.max_bytes)
    if args.corpus is not None and (not args.corpus.strip() or not Path(args.corpus).exists()):
        raise ValueError(f"--corpus {args.corpus!r} does not exist")
    sweep.train_config()  # bad settings fail here, before any process starts
    counts = lm.check_budget(sweep)
    out = Path(args.out)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if sweep.batch_size % size:
        raise ValueError(f"--batch-size {sweep.batch_size} must be a multiple of the number of processes ({size})")
    rank = _start_distributed(args.device) if size > 1 else 0
    if rank == 0:
        _writable(out)
    device = _device(args.device) if size == 1 else _distributed_device()
    rows = _finished_rows(out / "results.json", "lm", args.preset, asdict(sweep))
    todo = [m for m in sweep.memories if m not in {r["memory"] for r in rows}]
    if rank == 0:
        console.print(f"ttr lm --preset {args.preset}: {len(sweep.memories)} models of "
                      f"{min(counts.values()) / 1e6:.2f}-{max(counts.values()) / 1e6:.2f}M parameters, "
                      f"{sweep.tokens / 1e6:.2g}M training bytes each, {size} process(es)"
                      + (f", {len(rows)} already trained" if rows else ""))

    def finished(row: dict) -> tuple[str, str]:
        rows.append(row)
        if rank == 0:
            lm.save(out, args.preset, sweep, rows)
        return lm.run_key(row["memory"]), f"{row['bits_per_byte']:.3f} bits/byte"

    if size > 1:  # every process trains every run together (DistributedDataParallel), one after another
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", size)))
        with _progress() as bar:
            for memory in todo:
                live = _LiveBar(bar, lm.run_key(memory), sweep.steps) if rank == 0 else None
                finished(lm.train_one(sweep, memory, out, device, live, threads))
    else:
        _in_pool(args.jobs, f"lm {args.preset} runs", len(sweep.memories), len(rows), sweep.steps,
                 [(lm.train_one, (sweep, m, out, device)) for m in todo], finished)
    if rank != 0:
        return
    paths = lm.save(out, args.preset, sweep, rows)
    table = Table(title=f"Byte-level LM ({args.preset}): {sweep.n_layers} layers, d_model {sweep.d_model}, "
                        f"{sweep.tokens / 1e6:.2g}M bytes each", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("memory", "params", "val loss", "bits/byte", "tokens/s"):
        table.add_column(col, justify="left" if col == "memory" else "right", no_wrap=True)
    for r in sorted(rows, key=lambda r: r["val_loss"]):
        table.add_row(r["memory"], f"{r['parameters'] / 1e6:.3f}M", f"{r['val_loss']:.3f}",
                      f"{r['bits_per_byte']:.3f}", f"{r['tokens_per_s']:.0f}")
    console.print(table)
    row = rows[0]
    console.print(f"corpus: {row['corpus']}, {row['train_files']} training files ({row['train_bytes'] / 1e6:.1f} MB), "
                  f"{row['val_files']} held-out files ({row['val_bytes'] / 1e3:.0f} kB evaluated); tokens/s: "
                  f"training steps only, all processes together")
    console.print(f"saved {', '.join(str(p) for p in paths)}")


class _LiveBar:
    """A progress bar that takes a run's (key, step, text) reports directly (no queue: same process)."""

    def __init__(self, bar: Progress, key: str, steps: int) -> None:
        self.bar, self.task = bar, bar.add_task(key, total=steps)

    def put(self, report: tuple) -> None:
        key, step, text = report
        self.bar.update(self.task, completed=step, description=f"{key} {text}")


def _start_distributed(device: str) -> int:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs); this process's rank."""
    import torch
    import torch.distributed as dist

    cuda = device != "cpu" and _cuda()
    if cuda:
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def _distributed_device() -> str:
    import os

    import torch.distributed as dist

    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if dist.get_backend() == "nccl" else "cpu"


def cmd_reproduce(args: argparse.Namespace) -> None:
    import time

    from .experiments import report

    out = Path(args.out)
    _writable(out)
    start = time.perf_counter()
    console.rule("1/3 switching regression (ttr regress)")
    cmd_regress(argparse.Namespace(dim=16, length=1024, sequences=64, seed=0, decay=0.95, step=0.5,
                                   out=str(out / "regress")))
    console.rule("2/3 memory capacity (ttr capacity)")
    cmd_capacity(argparse.Namespace(dim=16, trials=32, seed=0, out=str(out / "capacity")))
    console.rule("3/3 multi-query associative recall (ttr mqar --preset quick)")
    cmd_mqar(argparse.Namespace(preset="quick", memories="all", steps=None, jobs=args.jobs, device="cpu",
                                out=str(out / "mqar")))
    path = report.write(out, time.perf_counter() - start)
    console.rule("claims")
    for line in path.read_text().split("## Claims")[1].split("##")[0].strip().splitlines():
        if line:
            console.print(line)
    console.print(f"wrote {path}")


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from . import bench

    args.device = _device(args.device)
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; give the path of a JSON file")
    cfg = bench.BenchConfig(lengths=args.lengths, head_dims=args.head_dims, gates=tuple(args.gates.split(",")),
                            ops=tuple(bench.CASES) if args.ops == "all" else tuple(args.ops.split(",")),
                            heads=args.heads, batch=args.batch, chunk_size=args.chunk_size,
                            recurrent_lengths=args.recurrent_lengths, repeats=args.repeats, device=args.device,
                            conditioning_length=args.conditioning_length, out=args.out, resume=args.resume,
                            threads=args.threads)
    _writable(Path(cfg.out).parent)
    total = 2 * len(bench.grid(cfg)) + 2  # timing and memory per row, the paired ratios, the packed sequences
    with _progress() as bar:
        task = bar.add_task("bench", total=total)

        def step(desc: str) -> None:
            bar.update(task, description=desc)
            bar.advance(task)

        matmul, rows, ratios, solvers, conditioning, varlen, nystrom = bench.run(cfg, progress=step)
    path = Path(cfg.out)
    threads = f"{torch.get_num_threads()} threads" if cfg.device == "cpu" else cfg.device
    title = (f"B={cfg.batch}, H={cfg.heads}, float32, chunk {cfg.chunk_size} (mini-batch {bench.MINI_BATCH}), "
             f"{threads}; matmul {matmul:.0f} GFLOP/s; freed memory {'kept' if freed_memory_kept() else 'released'}")
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    for c in ("op", "g", "D", "T", "fwd", "chk", "f+b", "med", "spr", "xrec", "xsdpa", "GF/s", "%mm", "MB"):
        table.add_column(c, justify="left" if c == "op" else "right", no_wrap=True)
    timed = [r for r in rows if r.op not in bench.VARIANT_OPS]  # the variants have their own table
    for r in timed:
        table.add_row(_OP_SHORT.get(r.op, r.op), r.gate[0], str(r.D), str(r.T), _ms(r.chunk_fwd_ms),
                      "-" if r.checks_share is None else f"{100 * r.checks_share:.0f}",
                      _ms(r.chunk_fwdbwd_min_ms), _ms(r.chunk_fwdbwd_ms),
                      "-" if r.spread is None else f"{100 * r.spread:.0f}",
                      "-" if r.speedup is None else f"{r.speedup:.0f}",
                      f"{r.vs_sdpa:.1f}",
                      "-" if r.chunk_gflops is None else f"{r.chunk_gflops:.0f}",
                      "-" if r.chunk_gflops is None else f"{100 * r.chunk_gflops / matmul:.0f}", "-" if r.peak_mb is None else f"{r.peak_mb:.0f}")
    console.print(table if timed else title)
    warning = bench.load_warning(rows)
    if warning:
        console.print(f"[yellow]{warning}[/yellow]")
    variants = bench.variant_table(rows)
    if len(variants) > 1:
        for line in variants:
            console.print(line, highlight=False, soft_wrap=True)
        console.print(bench.VARIANT_LEGEND, highlight=False)
    if nystrom:
        for line in bench.nystrom_table(nystrom):
            console.print(line, highlight=False)
    if ratios:
        ratio_table = Table(title="f+b over a baseline, the two timed in\nalternation: ratios of min and median",
                            box=box.SIMPLE_HEAD, padding=(0, 1))
        for c in ("op", "over", "D", "T", "min", "med"):
            ratio_table.add_column(c, justify="left" if c in ("op", "over") else "right", no_wrap=True)
        for x in ratios:
            ratio_table.add_row(_short_row(x["row"]), _short_row(x["over"]), str(x["D"]), str(x["T"]),
                                f"{x['min_ratio']:.2f}", f"{x['median_ratio']:.2f}")
        console.print(ratio_table)
    if solvers:
        solver_table = Table(title=f"mesa, gated, T={solvers[0]['T']}, D={solvers[0]['D']}, H={cfg.heads}: "
                             "solvers against the float64 exact solve", box=box.SIMPLE_HEAD, padding=(0, 1))
        for c in ("solver", "rel. error", "f+b ms"):
            solver_table.add_column(c, justify="right")
        for s in solvers:
            solver_table.add_row(s["solver"], f"{s['rel_error_vs_float64']:.2e}", _ms(s["fwdbwd_ms"]))
        console.print(solver_table)
    if conditioning:
        cond_table = Table(title=f"mesa in float32, ill-conditioned: T={conditioning[0]['T']}, D={conditioning[0]['D']}, "
                           "3 repeated unit keys; relative error against float64", box=box.SIMPLE_HEAD, padding=(0, 1))
        for c in ("weights", "lamb", "chunk", "recurrent"):
            cond_table.add_column(c, justify="right")
        for c in conditioning:
            cond_table.add_row(c["weights"], f"{c['lamb']:g}", f"{c['chunk_rel_error']:.1e}",
                               f"{c['recurrent_rel_error']:.1e}")
        console.print(cond_table)
    if varlen:
        v0 = varlen[0]
        varlen_table = Table(title=f"{v0['N']} packed sequences, {v0['tokens']} tokens (up to T={v0['T_max']}), "
                             f"D={v0['D']}: chunk f+b ms, min / median", box=box.SIMPLE_HEAD, padding=(0, 1))
        for c in ("op", "g", "packed", "padded", "loop", "pad/pack", "loop/pack"):
            varlen_table.add_column(c, justify="left" if c == "op" else "right", no_wrap=True)
        for v in varlen:
            varlen_table.add_row(_OP_SHORT.get(v["op"], v["op"]), v["gate"][0],
                                 *(f"{_ms(v[f'{n}_min_ms'])}/{_ms(v[f'{n}_median_ms'])}" for n in ("packed", "padded", "loop")),
                                 f"{v['padded_min_ms'] / v['packed_min_ms']:.2f}", f"{v['loop_min_ms'] / v['packed_min_ms']:.2f}")
        console.print(varlen_table)
    if timed:
        console.print("op: la linear_attention, dr delta_rule, lh longhorn, dp delta_product, ttt ttt_linear, "
                      "mlp ttt_mlp, tit titans, sm softmax (local polynomial order 0), ll local_linear (order 1), mlstm; "
                      "g: gate (n none, s scalar, v vector, b vector with RWKV-6's bonus, c complex (GateLoop), "
                      "e per state entry (Mamba)). "
                      "fwd: chunk form forward, ms (median); chk: what the value checks add to it, % (min with over "
                      "min without, ttr.checks(False)); f+b, med: its forward+backward, min and median of the "
                      "repeats (interleaved with the forward); spr: the row's largest spread of repeats, max / min - 1, "
                      "%. xrec, xsdpa: the recurrent form's forward+backward (one call) and causal SDPA's (min), both in "
                      "the JSON in ms, over the chunk form's minimum (>1: chunk faster). GF/s: the chunk "
                      "form's matrix-product flops (forward x3) per second of its fastest forward+backward, %mm: of "
                      "the matmul. MB: memory the chunk forward+backward adds at its peak.")
    console.print(f"saved {path}")


def cmd_decode_bench(args: argparse.Namespace) -> None:
    from . import bench_decode

    memories = bench_decode.MEMORIES if args.memories == "all" else tuple(args.memories.split(","))
    max_context = dict(bench_decode.MAX_CONTEXT)
    for item in filter(None, args.max_context.split(",")):
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--max-context takes name=N pairs, comma-separated, got {item!r}")
        max_context[name] = int(n)
    cfg = bench_decode.DecodeConfig(memories=memories, contexts=args.contexts, d_model=args.d_model, heads=args.heads,
                                    batch=args.batch, layers=args.layers, steps=args.steps, repeats=args.repeats,
                                    threads=args.threads, max_context=max_context, seed=args.seed, out=args.out)
    _writable(Path(cfg.out))
    with _progress() as bar:
        task = bar.add_task("decode-bench", total=bench_decode.ticks(cfg))

        def step(desc: str) -> None:
            bar.update(task, description=desc)
            bar.advance(task)

        rows = bench_decode.run(cfg, progress=step)
    import torch

    console.print(f"decoding one token per step: d_model {cfg.d_model}, {cfg.heads} heads, {cfg.layers} layer(s), "
                  f"batch {cfg.batch}, float32, {torch.get_num_threads()} CPU threads; ms per token, median of "
                  f"{cfg.repeats} repeats (min, max and tokens/s in the JSON and CSV)")
    for line in bench_decode.table(rows):
        console.print(line, highlight=False, soft_wrap=True)
    console.print("x: over the plain attention layer (qkv and output projections, preallocated KV cache, SDPA) at "
                  "the same context, the median of each repeat's ratio (the two measured moments apart). Saved "
                  f"{Path(cfg.out) / 'decode.json'}, decode.csv, decode.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttr", description="Test-time regression sequence layers: "
                                     "the named systems, the single-forward-pass experiment, and benchmarks.",
                                     epilog="On glibc, ttr keeps the memory it frees, so each step reuses the "
                                     "last one's pages (TTR_RELEASE_MEMORY=1 or your own MALLOC_* settings: "
                                     "glibc's defaults).")
    sub = parser.add_subparsers(dest="command", required=True)
    shows_defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    p = sub.add_parser("zoo", help="print the named systems: weights, function class, optimizer, op, forms")
    p.add_argument("--all", action="store_true", help="every combination of ingredients instead, one table per "
                   "function class in short codes with legends: which have a chunk form (a fast op), which run on "
                   "the generic recurrent executor, and which define no regression problem, and why")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("regress", help="every memory on the slides' switching-process regression, no learned "
                       "parameters; prints a table and saves a PNG", **shows_defaults,
                       description="Keys follow k_{t+1} = 0.999 k_t + 0.02 eps before T/4 and 0.9 k_t + 0.02 eps "
                       "after; each memory predicts v_t = k_{t+1}/||k_{t+1}|| from the associations before t.")
    p.add_argument("--dim", type=_at_least(1), default=16, help="key dimension")
    p.add_argument("--length", type=_at_least(64), default=1024, help="sequence length T, at least 64")
    p.add_argument("--sequences", type=_at_least(1), default=64, help="sequences averaged")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--decay", type=float, default=0.95, help="decay of gated memories without parameters")
    p.add_argument("--step", type=float, default=0.5, help="step size of online learners without parameters")
    p.add_argument("--out", default="runs/regress", help="output folder for regress.png and results.json")
    p.set_defaults(func=cmd_regress)

    p = sub.add_parser("capacity", help="how many key-value pairs each memory recalls, no learned parameters; "
                       "prints tables, saves a PNG", **shows_defaults)
    p.add_argument("--dim", type=_at_least(1), default=16, help="key dimension d (pairs N run from 1 to 4 d)")
    p.add_argument("--trials", type=_at_least(1), default=32, help="random draws averaged per point")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="runs/capacity", help="output folder for capacity.png, .json and .csv")
    p.set_defaults(func=cmd_capacity)

    p = sub.add_parser("mqar", help="train one-layer models on multi-query associative recall: every memory, "
                       "with and without its short convolution; prints a table, saves PNGs", **shows_defaults)
    p.add_argument("--preset", choices=("quick", "zoology"), default="quick",
                   help="quick: a 2-core CPU in about 10 minutes; zoology: Zoology's grid, for a GPU")
    p.add_argument("--memories", default="all", help="presets to train, comma-separated (see ttr zoo)")
    p.add_argument("--steps", type=_at_least(1), default=None, help="training steps per run (None: the preset's)")
    p.add_argument("--jobs", type=_at_least(1), default=2, help="runs trained at once, one CPU thread each")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto: cuda if present")
    p.add_argument("--out", default="runs/mqar", help="output folder; rerunning continues what it holds")
    p.set_defaults(func=cmd_mqar)

    p = sub.add_parser("lm", help="train small byte-level language models, one per memory, under the same "
                       "budget, on a local corpus; prints a table, saves a PNG (torchrun: data parallel)",
                       **shows_defaults, description="Each memory gets the same parameter count (within 10 percent), "
                       "the same training bytes and the same windows. Under torchrun --nproc_per_node N -m ttr lm "
                       "the runs go one after another, each trained by all N processes (DistributedDataParallel).")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: 2-layer models, a 2-core CPU in a few minutes; gpu: 8 layers, d_model 512")
    p.add_argument("--memories", default="preset", help="presets to train, comma-separated; a/b alternates a "
                   "and b over the layers (a hybrid); 'preset': the preset's list")
    p.add_argument("--corpus", default=None, help="a text file or folder, held out by file (None: the Python "
                   "standard library's sources)")
    p.add_argument("--max-bytes", type=_at_least(1024), default=None, help="bytes of the corpus read (None: the "
                   "preset's)")
    p.add_argument("--steps", type=_at_least(1), default=None, help="training steps (None: the preset's)")
    p.add_argument("--batch-size", type=_at_least(1), default=None, help="global batch in sequences (None: the "
                   "preset's)")
    p.add_argument("--seq-len", type=_at_least(2), default=None, help="bytes per sequence (None: the preset's)")
    p.add_argument("--d-model", type=_at_least(1), default=None, help="model width (None: the preset's)")
    p.add_argument("--layers", type=_at_least(1), default=None, help="blocks (None: the preset's)")
    p.add_argument("--heads", type=_at_least(1), default=None, help="heads (None: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (None: the preset's)")
    p.add_argument("--jobs", type=_at_least(1), default=2, help="runs trained at once, one CPU thread each "
                   "(without torchrun)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto: cuda if present")
    p.add_argument("--out", default="runs/lm", help="output folder; rerunning continues what it holds")
    p.set_defaults(func=cmd_lm)

    p = sub.add_parser("reproduce", help="regress, capacity and mqar --preset quick into one folder, and "
                       "report.md with every table, plot and claim (about 8 minutes on 2 cores)", **shows_defaults)
    p.add_argument("--jobs", type=_at_least(1), default=2, help="MQAR runs trained at once, one CPU thread each")
    p.add_argument("--out", default="runs/reproduce", help="output folder; rerunning continues what it holds")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("bench", help="time chunk vs recurrent vs causal SDPA, GFLOP/s vs matmul, peak memory",
                       **shows_defaults)
    p.add_argument("--lengths", type=_ints, default="512,1024,2048,4096,8192", help="T values, comma-separated")
    p.add_argument("--head-dims", type=_ints, default="64,128", help="head dims, comma-separated")
    p.add_argument("--gates", default="none,scalar,vector,bonus,complex,entry",
                   help="gate kinds among none, scalar, vector, bonus (RWKV-6), complex (GateLoop), entry (Mamba; "
                   "timed at head dims <= 64)")
    p.add_argument("--ops", default="all", help="ops to time, comma-separated, among linear_attention, mlstm, "
                   "delta_rule, longhorn, delta_product, ttt_linear, ttt_mlp, titans, mesa, softmax, local_linear, "
                   "and the variants, whatever the gates: feature_map (linear attention with RFA, Hedgehog, "
                   "ReBased, DiJiang, Based, DPFP, poly2 features), window (sliding windows against the full causal "
                   "forms), noncausal (SOFT, Skyformer, non-causal linear attention against non-causal SDPA, and "
                   "the Nystrom errors)")
    p.add_argument("--heads", type=_at_least(1), default=4, help="heads")
    p.add_argument("--batch", type=_at_least(1), default=1, help="batch size")
    p.add_argument("--chunk-size", type=_at_least(1), default=64, help="chunk size of the chunk form")
    p.add_argument("--recurrent-lengths", type=_ints, default="1024,4096",
                   help="T values at which the (slow) recurrent form is timed too")
    p.add_argument("--conditioning-length", type=_at_least(1), default=16384,
                   help="T of mesa's float32 accuracy check on ill-conditioned keys")
    p.add_argument("--repeats", type=_at_least(1), default=3, help="timed repeats per measurement, interleaved "
                   "across the forms a row compares (min, median and spread)")
    p.add_argument("--threads", type=_at_least(1), default=None, help="torch CPU threads (None: torch's own)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto: cuda if present")
    p.add_argument("--out", default="runs/bench/bench.json", help="JSON output path, rewritten after every row")
    p.add_argument("--resume", action="store_true", help="reuse the rows an interrupted run with the same "
                   "settings left in --out")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("decode-bench", help="decoding latency per token and tokens/s against the context, for "
                       "each memory next to a plain attention layer; prints a table, saves JSON, CSV and a PNG",
                       **shows_defaults)
    p.add_argument("--memories", default="all", help="presets, comma-separated; all: gated_deltanet, gla, mesanet, "
                   "softmax_attention, local_linear, intention")
    p.add_argument("--contexts", type=_ints, default="1024,2048,4096,8192,16384", help="context lengths")
    p.add_argument("--max-context", default="", help="name=N,...: measure a memory only up to context N, on top "
                   "of intention=2048")
    p.add_argument("--d-model", type=_at_least(1), default=1024, help="model width")
    p.add_argument("--heads", type=_at_least(1), default=16, help="heads")
    p.add_argument("--batch", type=_at_least(1), default=1, help="rows decoded at once")
    p.add_argument("--layers", type=_at_least(1), default=1, help="layers in the stack of each system")
    p.add_argument("--steps", type=_at_least(2), default=32, help="timed steps per repeat, at most (fewer for "
                   "slow systems: about 0.25 s each)")
    p.add_argument("--repeats", type=_at_least(1), default=7, help="repeats (min, median, max)")
    p.add_argument("--threads", type=_at_least(1), default=None, help="torch CPU threads (None: torch's own)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="runs/decode_bench", help="output folder (decode.json, .csv, .png)")
    p.set_defaults(func=cmd_decode_bench)
    return parser


def _device(device: str) -> str:
    """--device: auto (cuda if present), cpu, cuda or cuda:N, refused before any compute where it cannot run."""
    if device == "auto":
        return "cuda" if _cuda() else "cpu"
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda") and not _cuda():
        raise ValueError(f"--device {device}: this torch ({_torch_version()}) sees no CUDA device")
    return device


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:  # what was saved stays saved: files are written whole, after every row
        console.print("interrupted")
        return 130
    return 0


def run(argv: list[str] | None = None) -> int:
    """The `ttr` executable: main, in a process that keeps the memory it frees (ttr._memory)."""
    keep_freed_memory()
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
