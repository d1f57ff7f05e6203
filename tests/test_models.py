"""The language model: prefill + decode through the cache equals one forward for every preset (left-padded
batches too), generation, initialization, configuration errors, the text corpus, `ttr lm`, resume and DDP."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttr.cli import main
from ttr.experiments import lm
from ttr.models import LanguageModel, LMConfig, generate, next_token, pad_prompts
from ttr.recipe import PRESETS, get_preset
from ttr.tasks.text import SEPARATOR, Windows, load_corpus
from ttr.train import TrainConfig, train

from conftest import causal_presets

VOCAB = 40


def tiny(memory, **kw) -> LanguageModel:
    """A small model whose weights are large enough (init_std 0.3) that its greedy continuations vary."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, memory=memory, chunk_size=4,
                   **{"init_std": 0.3, **kw})
    return LanguageModel(cfg).eval()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> float:
    err = float((a - b).abs().max() / b.abs().max())
    assert err < tol, err
    return err


@pytest.mark.parametrize("memory", [*causal_presets(), ("gated_deltanet", "softmax_attention"), (get_preset("gla").recipe,
                                                                                      "mesanet")])
@torch.no_grad()
def test_prefill_then_decode_equals_one_forward(memory):
    model = tiny(memory)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 11)]
    close(torch.cat(steps, 1), full)
    assert cache.seen.tolist() == [11, 11]
    # a left-padded batch: row 1 holds 7 tokens; its logits equal the row's own, prefill + decode or one call
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    alone = model(ids[1:, 4:])[0]
    close(model(ids, attention_mask=mask)[1, 4:], alone)
    cache = model.new_cache()
    padded = [model(ids[:, :6], cache, mask[:, :6])] + [model(ids[:, t:t + 1], cache) for t in range(6, 11)]
    close(torch.cat(padded, 1)[1, 4:], alone)
    assert cache.seen.tolist() == [11, 7]


def test_cache_rows_select_and_reorder_like_beams():
    model = tiny("gated_deltanet")
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :6], cache)
        picked = cache.reorder(torch.tensor([2, 0, 0]))
        out = model(ids[[2, 0, 0], 6:], picked)
        close(out, model(ids[[2, 0, 0]])[:, 6:])


def test_greedy_generation_is_the_argmax_chain_and_rows_do_not_interact():
    model = tiny("mesanet")
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ids, mask = pad_prompts(prompts)
    assert mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]]
    out = generate(model, ids, mask, max_new_tokens=6)
    assert all(len(set(out[row, 5:].tolist())) > 2 for row in range(2))  # continuations that tell rows apart
    for row, prompt in enumerate(prompts):
        seq = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(6):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        assert out[row, 5:].tolist() == seq[0, len(prompt):].tolist()
        assert generate(model, torch.tensor([prompt]), max_new_tokens=6)[0, len(prompt):].tolist() == \
            out[row, 5:].tolist()


def test_sampling_controls():
    model = tiny("gla")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, ids, max_new_tokens=5)
    assert torch.equal(generate(model, ids, max_new_tokens=5, temperature=1.0, top_k=1), greedy)
    assert torch.equal(generate(model, ids, max_new_tokens=5, temperature=1.0, top_p=1e-6), greedy)
    draw = lambda seed: generate(model, ids, max_new_tokens=5, temperature=0.8, top_p=0.9,  # noqa: E731
                                 generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0))
    assert int(draw(0).max()) < VOCAB
    # the supports: top-k keeps the k largest; top-p the smallest set reaching p
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = logits[0].softmax(-1)
    assert p[:2].sum() < 0.9 < p[:3].sum()
    assert set(next_token(logits, 1.0, top_p=0.9, generator=g).tolist()) == {0, 1, 2}
    counts = torch.bincount(next_token(logits, 1.0, generator=g), minlength=5) / 4000
    assert (counts - p).abs().max() < 0.03


def test_generation_stops_at_eos_and_pads_after_it():
    model = tiny("softmax_attention")
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    free = generate(model, ids, max_new_tokens=8)
    assert len(set(free[0, 4:].tolist())) > 3
    eos = int(free[0, 6])  # row 0's third new token
    for eos_token_id in (eos, [VOCAB - 2, eos]):  # one id, or a list of them (Hugging Face's form)
        out = generate(model, ids, max_new_tokens=8, eos_token_id=eos_token_id, pad_token_id=VOCAB - 1)
        first = int((free[0, 4:] == eos).nonzero()[0, 0]) + 4
        assert out[0, :first + 1].tolist() == free[0, :first + 1].tolist()
        assert (out[0, first + 1:] == VOCAB - 1).all()  # and stays padding: a finished row never restarts


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
    ({"pad_token_id": -1}, r"pad_token_id must be a token id in \[0, 40\), got -1"),
    ({"eos_token_id": [1, 99]}, "eos_token_id must be None, a token id"), ({"eos_token_id": []}, "eos_token_id")])
def test_generation_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny("gla"), torch.zeros(1, 3, dtype=torch.long), **kwargs)


def test_right_padding_is_refused_in_generation():
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(tiny("gla"), torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]))


def test_initialization_tying_and_parameter_count():
    cfg = LMConfig(vocab_size=256, d_model=128, n_layers=6, n_heads=4, memory="gated_deltanet")
    model = LanguageModel(cfg)
    assert model.head.weight is model.embed.weight
    assert abs(float(model.embed.weight.detach().std()) - 0.02) < 1e-3
    depth = 0.02 / math.sqrt(2 * 6)
    assert abs(float(model.blocks[0].layer.out.weight.std()) - depth) < 3e-4
    assert abs(float(model.blocks[5].mlp.down.weight.std()) - depth) < 3e-4
    assert abs(float(model.blocks[0].mlp.up.weight.std()) - 0.02) < 1e-3
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    untied = LanguageModel(LMConfig(vocab_size=256, d_model=128, n_layers=6, n_heads=4, tie_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + 256 * 128
    assert model.num_parameters(embeddings=False) == model.num_parameters() - 256 * 128
    assert cfg.mlp_hidden == 352  # 8/3 * 128 rounded up to a multiple of 16
    assert not hasattr(LanguageModel(LMConfig(mlp_width=0)).blocks[0], "mlp")


@pytest.mark.parametrize("kwargs, message", [
    ({"memory": ("gated_deltanet", "nope")}, "layer 1: unknown preset 'nope'"),
    ({"memory": ("gla",) * 3}, "memory lists 3 layers, n_layers is 2"),
    ({"d_model": 30, "n_heads": 4}, "n_heads = 4 does not divide d_model = 30"),
    ({"vocab_size": 0}, "vocab_size must be a positive int"),
    ({"mlp_width": -2}, "mlp_width"),
    ({"init_std": float("nan")}, "init_std")])
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LMConfig(**{"n_layers": 2, **kwargs})


def test_bad_inputs_are_clear_errors():
    model = tiny("gla")
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size = 40\)"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="cache must be the ModelCache"):
        model(torch.tensor([[1, 2]]), cache=[None, None])


def test_config_round_trips_as_data():
    cfg = LMConfig(memory=("gla", "softmax_attention", "gla", "mesanet"), dt_range=(1e-4, 1e-3))
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Recipe object"):
        LMConfig(n_layers=1, memory=get_preset("gla").recipe).to_dict()
    with pytest.raises(ValueError, match=r"unknown LMConfig fields \['colour'\]"):
        LMConfig.from_dict({"colour": 1})


# ---------------------------------------------------------------------------------------------------------
# data, training, ttr lm


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for i in range(60):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # file {i}\n" * 20)
    (root / "blob.bin").write_bytes(bytes(range(256)))  # binary: skipped
    return root


def test_corpus_holds_out_whole_files(corpus_dir: Path):
    corpus = load_corpus(corpus_dir)
    assert corpus.train_files + corpus.val_files == 60 and corpus.val_files >= 1
    train_docs = {bytes(d) for d in bytes(corpus.train.tolist()).split(bytes([SEPARATOR]))}
    val_docs = {bytes(d) for d in bytes(corpus.val.tolist()).split(bytes([SEPARATOR]))}
    assert len(train_docs) == corpus.train_files and len(val_docs) == corpus.val_files
    assert not train_docs & val_docs
    single = corpus_dir / "pkg0" / "m0.py"
    one = load_corpus(single)
    assert bytes(one.train.tolist()) + bytes(one.val.tolist()) == single.read_bytes()
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(corpus_dir / "nowhere")
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus("")  # not the current folder


def test_about_five_percent_of_files_are_held_out_and_never_none(tmp_path: Path):
    from ttr.tasks.text import HELD_OUT, _share

    held = sum(_share(f"pkg/module_{i}.py") < HELD_OUT for i in range(20000)) / 20000
    assert abs(held - HELD_OUT) < 0.006
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        (few / f"{i}.txt").write_text(f"text number {i}\n" * 50)
    corpus = load_corpus(few)
    assert (corpus.train_files, corpus.val_files) == (2, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        load_corpus(tmp_path / "empty")


def test_windows_predict_the_next_byte():
    data = torch.arange(50, dtype=torch.uint8)
    w = Windows(data, 8)
    assert len(w) == 6
    x, y = w[torch.tensor([0, 5])]
    assert x[1].tolist() == list(range(40, 48)) and y[1].tolist() == list(range(41, 49))
    exact = Windows(torch.arange(48, dtype=torch.uint8), 8)  # 48 bytes: 5 whole windows (a 6th needs byte 48)
    assert len(exact) == 5 and exact[torch.tensor([4])][1][0, -1] == 40
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Windows(data, 64)


def _small_sweep(corpus: Path) -> lm.LMSweep:
    """What `ttr lm --corpus corpus` with _ARGS (below) trains."""
    return lm.overrides(lm.SWEEPS["cpu"], memories=("gated_deltanet",), d_model=32, n_layers=2, n_heads=2,
                        seq_len=32, batch_size=4, steps=10, corpus=str(corpus))


def test_training_resumes_where_it_stopped(corpus_dir: Path, tmp_path: Path):
    sweep = _small_sweep(corpus_dir)
    train_set, val_set, _ = lm.data(sweep)

    def run(checkpoint: Path, stop_at: int | None = None) -> LanguageModel:
        torch.manual_seed(0)
        model = LanguageModel(sweep.model_config("gated_deltanet"))

        def progress(step: int, metrics: dict) -> None:
            if step == stop_at:
                raise KeyboardInterrupt

        try:
            train(model, train_set, val_set, sweep.train_config(), checkpoint=checkpoint, progress=progress)
        except KeyboardInterrupt:
            pass
        return model

    whole = run(tmp_path / "a.pt")
    run(tmp_path / "b.pt", stop_at=5)  # the last checkpoint is step 4's (every 2 steps)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["state"]["step"] == 4
    resumed = run(tmp_path / "b.pt")
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


class _StopAtStep5:
    """A run's progress report that interrupts it at step 5 (its last checkpoint is step 4's)."""

    def put(self, report):
        if report[1] == 5:
            raise KeyboardInterrupt


def test_a_checkpoint_resumes_only_its_own_run(corpus_dir: Path, tmp_path: Path):
    """A run interrupted, then restarted with other data or model settings, is refused (it would have reported
    the first run's numbers as the second's)."""
    sweep = _small_sweep(corpus_dir)

    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        lm.train_one(sweep, "gated_deltanet", tmp_path, "cpu", _StopAtStep5())
    for change in ({"seq_len": 16}, {"d_model": 48}, {"max_bytes": 5000}):
        with pytest.raises(ValueError, match="another model or data"):
            lm.train_one(lm.overrides(sweep, **change), "gated_deltanet", tmp_path, "cpu")
    torch.set_num_threads(threads)


def test_a_checkpoint_interrupted_while_written_leaves_the_previous_one(corpus_dir: Path, tmp_path: Path,
                                                                        monkeypatch):
    sweep = _small_sweep(corpus_dir)
    train_set, val_set, _ = lm.data(sweep)
    saves = []
    real_save = torch.save

    def save(obj, f):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint: interrupted half-way
            f.write_bytes(b"half")
            raise KeyboardInterrupt
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(LanguageModel(sweep.model_config("gated_deltanet")), train_set, val_set, sweep.train_config(),
              checkpoint=path)
    assert torch.load(path, weights_only=True)["state"]["step"] == 2


def test_each_process_trains_on_its_own_slice_of_the_global_batch(monkeypatch):
    """Under torch.distributed, process r of W reads examples r, r + W, ... of the step's global batch: the
    processes' examples are disjoint and together the batch one process would read."""
    import ttr.train as loop
    from ttr.train import batch_indices

    class Recorder:
        def __init__(self, n: int) -> None:
            self.n, self.seen = n, []

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, index):
            self.seen.append(index.tolist())
            return torch.zeros(len(index), 4, dtype=torch.long), torch.zeros(len(index), 4, dtype=torch.long)

    model = torch.nn.Sequential(torch.nn.Embedding(3, 3))
    cfg = TrainConfig(steps=3, batch_size=6, eval_every=100, seed=5)
    monkeypatch.setattr(loop.nn.parallel, "DistributedDataParallel", lambda m: m)
    monkeypatch.setattr(loop, "_all_sum", lambda t: t)
    monkeypatch.setattr(loop.dist, "barrier", lambda: None)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(loop, "world", lambda rank=rank: (rank, 2))
        data = Recorder(50)
        train(model, data, (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)), cfg)
        seen.append(data.seen)
    for step in range(3):
        a, b = seen[0][step], seen[1][step]
        assert len(a) == len(b) == 3 and not set(a) & set(b)
        assert sorted(a + b) == sorted(batch_indices(50, 6, 5, step).tolist())


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1, min_lr=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)  # linear warm-up over 10
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(55) == pytest.approx(0.55)  # cosine midpoint
    assert cfg.lr_at(100) == pytest.approx(0.1) and cfg.lr_at(99) > 0.1


def test_budget_check_refuses_unequal_models(monkeypatch):
    sweep = lm.LMSweep(memories=("softmax_attention", "gla"), d_model=32, n_layers=2, n_heads=2)
    counts = lm.check_budget(sweep)
    assert counts["gla"] > counts["softmax_attention"]
    monkeypatch.setattr(lm, "BUDGET_SPREAD", 0.001)
    with pytest.raises(ValueError, match="parameter counts differ by more than 0%"):
        lm.check_budget(sweep)


def test_layer_patterns_make_hybrids():
    assert lm.layer_pattern("a/a/a/b", 8) == ("a", "a", "a", "b") * 2
    assert lm.layer_pattern("gla", 3) == ("gla",) * 3


@pytest.mark.parametrize("argv, message", [
    (["--memories", "gla,nope"], "unknown preset 'nope'"),
    (["--memories", "gla/nope"], "unknown preset 'nope' in 'gla/nope'"),
    (["--d-model", "30", "--heads", "4"], "n_heads = 4 does not divide d_model = 30"),
    (["--lr", "-1"], "lr must be"),
    (["--corpus", "/nonexistent/corpus"], "--corpus"),
    (["--corpus", ""], "--corpus '' does not exist"),
    (["--memories", "gla,gla"], "names a memory twice"),
])
def test_lm_cli_errors(argv, message, tmp_path, capsys):
    assert main(["lm", *argv, "--out", str(tmp_path)]) == 2
    assert message in " ".join(capsys.readouterr().out.split())


_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
_ARGS = ["--memories", "gated_deltanet", "--steps", "10", "--batch-size", "4", "--seq-len", "32", "--d-model",
         "32", "--layers", "2", "--heads", "2"]


def _ttr_lm(nproc: int, out: Path, corpus: Path) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "ttr", "lm", "--corpus", str(corpus), *_ARGS, "--out", str(out)]
    done = subprocess.run(cmd, env=_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "gated_deltanet.pt", weights_only=True)["model"]


def test_two_processes_reach_the_weights_of_one_and_resume_across_process_counts(corpus_dir: Path, tmp_path: Path):
    """torchrun with 2 gloo processes (each half of the global batch) against one process; then a run
    interrupted in one process and resumed in two ends where the uninterrupted run does."""
    _ttr_lm(1, tmp_path / "one", corpus_dir)
    _ttr_lm(2, tmp_path / "two", corpus_dir)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), name
    histories = [torch.load(out / "checkpoints" / "gated_deltanet.pt", weights_only=True)["state"]["history"]
                 for out in (tmp_path / "one", tmp_path / "two")]
    for a, b in zip(*histories):  # the global batch's loss, and the whole held-out set evaluated once
        assert a["step"] == b["step"]
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    # interrupted at step 5 in this process (checkpoint of step 4), resumed by two processes
    sweep = _small_sweep(corpus_dir)

    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        lm.train_one(sweep, "gated_deltanet", tmp_path / "resumed", "cpu", _StopAtStep5())
    torch.set_num_threads(threads)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "gated_deltanet.pt", weights_only=True)["state"][
        "step"] == 4
    _ttr_lm(2, tmp_path / "resumed", corpus_dir)
    resumed = _weights(tmp_path / "resumed")
    for name in one:
        assert torch.allclose(one[name], resumed[name], rtol=1e-4, atol=1e-5), name
