"""The recall experiments' pieces: MQAR data (Zoology's protocol), the training loop, the capacity experiment."""

import math

import pytest
import torch

from ttr.experiments.capacity import CapacityConfig, run as run_capacity
from ttr.experiments.mqar import mqar_model
from ttr.tasks.mqar import IGNORE, MQARConfig, mqar, train_test
from ttr.train import TrainConfig, batch_indices, train


@pytest.mark.parametrize("random_filler", [False, True])
def test_mqar_examples_follow_the_protocol(random_filler):
    cfg = MQARConfig(vocab_size=64, seq_len=40, num_kv_pairs=5, random_filler=random_filler)
    x, y = mqar(cfg, 200, seed=3)
    assert x.shape == y.shape == (200, 40) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < 64
    N, half = 5, 32
    keys, values = x[:, 0:2 * N:2], x[:, 1:2 * N:2]
    assert bool(((keys >= 1) & (keys < half)).all()) and bool((values >= half).all())
    for row_keys, row_values in zip(keys, values):                       # drawn without replacement
        assert len(set(row_keys.tolist())) == N and len(set(row_values.tolist())) == N
    for b in range(200):
        where = (y[b] != IGNORE).nonzero().flatten()
        assert len(where) == N and bool((where >= 2 * N).all()) and bool(((where - 2 * N) % 2 == 0).all())
        pairs = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert sorted(x[b, where].tolist()) == sorted(pairs)             # each key is queried once
        assert all(pairs[int(x[b, t])] == int(y[b, t]) for t in where)  # and labelled with its value
        if not random_filler:
            rest = torch.ones(40, dtype=torch.bool)
            rest[:2 * N] = False
            rest[where] = False
            assert bool((x[b, rest] == 0).all())
    assert torch.equal(mqar(cfg, 200, seed=3)[0], x) and not torch.equal(mqar(cfg, 200, seed=4)[0], x)


def test_mqar_queries_sit_near_the_pairs_under_a_small_power():
    near = MQARConfig(vocab_size=256, seq_len=256, num_kv_pairs=4, power_a=0.01)
    uniform = MQARConfig(vocab_size=256, seq_len=256, num_kv_pairs=4, power_a=1.0)
    mean_position = [float((mqar(c, 500, 0)[1] != IGNORE).nonzero()[:, 1].double().mean()) for c in (near, uniform)]
    assert mean_position[0] < mean_position[1] - 30


def test_train_and_test_sets_share_no_example():
    cfg = MQARConfig(vocab_size=8, seq_len=8, num_kv_pairs=2, random_filler=False)  # few distinct examples
    (x, _), (xt, _) = train_test(cfg, 200, 50, seed=0)
    seen = {tuple(r) for r in x.tolist()}
    assert len(xt) == 50 and not any(tuple(r) in seen for r in xt.tolist())


@pytest.mark.parametrize("kw,match", [({"seq_len": 30, "num_kv_pairs": 8}, "4 \\* num_kv_pairs must be at most"),
                                      ({"vocab_size": 10, "num_kv_pairs": 5}, "fewer than num_kv_pairs"),
                                      ({"seq_len": 31}, "seq_len must be even"),
                                      ({"power_a": 0.0}, "power_a must lie in"),
                                      ({"num_kv_pairs": 0}, "num_kv_pairs must be a positive int")])
def test_impossible_mqar_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MQARConfig(**kw)


def test_batches_depend_on_seed_and_step_only():
    first = [batch_indices(10, 4, seed=1, step=s) for s in range(5)]
    assert all(torch.equal(a, batch_indices(10, 4, seed=1, step=s)) for s, a in enumerate(first))
    epoch = torch.cat(first)[:10]                                        # the first epoch: every example once
    assert sorted(epoch.tolist()) == list(range(10))


EASY = MQARConfig(vocab_size=32, seq_len=16, num_kv_pairs=2)


def _easy_run(steps, checkpoint=None, progress=None, target=None):
    train_set, test_set = train_test(EASY, 2048, 128, seed=0)
    torch.manual_seed(0)
    model = mqar_model(32, 32, "softmax_attention")
    result = train(model, train_set, test_set, TrainConfig(steps=steps, batch_size=32, lr=3e-3, eval_every=20,
                                                           target=target), checkpoint=checkpoint,
                   progress=progress)
    return model, result


def test_one_layer_after_a_short_convolution_learns_an_easy_mqar():
    """The learning path is real: softmax attention with its convolution reaches 90 % on an easy setting."""
    _, result = _easy_run(400, target=0.95)
    assert result["best_accuracy"] >= 0.9


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    _, whole = _easy_run(60)
    model_whole, _ = _easy_run(60)

    def interrupt(step, metrics):
        if step == 50:                                                   # the last checkpoint was at step 40
            raise KeyboardInterrupt

    path = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        _easy_run(60, checkpoint=path, progress=interrupt)
    model, resumed = _easy_run(60, checkpoint=path)
    assert resumed["history"] == whole["history"]                     # losses, accuracies, learning rates
    for a, b in zip(model.state_dict().values(), model_whole.state_dict().values()):
        assert torch.equal(a, b)
    seen = []
    _easy_run(60, checkpoint=path, progress=lambda step, m: seen.append(step))  # finished: not trained again
    assert seen == []


def test_training_refuses_a_checkpoint_of_other_settings(tmp_path):
    path = tmp_path / "run.pt"
    _easy_run(20, checkpoint=path)
    with pytest.raises(ValueError, match="was written with another training configuration"):
        _easy_run(40, checkpoint=path)


def test_exact_memory_recalls_every_pair_up_to_the_key_dimension():
    """The claim: mesa recalls all N <= d pairs on random keys; the outer-product memory does not (N = d and
    beyond), and recalls exactly on orthonormal keys."""
    rows = run_capacity(CapacityConfig(dim=8, trials=16))
    acc = {(r.keys, r.memory, r.pairs): r.accuracy for r in rows}
    err = {(r.keys, r.memory, r.pairs): r.error for r in rows}
    assert all(acc["random", "mesa", n] == 1.0 for n in range(1, 9) if ("random", "mesa", n) in acc)
    assert acc["random", "linear_attention", 16] < 0.8 and acc["random", "linear_attention", 8] < 1.0
    assert all(err["orthonormal", "linear_attention", n] < 1e-20 for n in (1, 2, 4, 8))
    assert acc["random", "softmax_attention", 32] > acc["random", "linear_attention", 32]  # a cache keeps every pair


def test_capacity_reads_the_cache_without_writing():
    """Softmax attention's recall is the Nadaraya-Watson average over the stored pairs only."""
    from ttr.experiments.capacity import _recall

    k = torch.nn.functional.normalize(torch.randn(2, 5, 4, dtype=torch.float64), dim=-1)
    v = torch.randn(2, 5, 4, dtype=torch.float64)
    w = torch.softmax(math.sqrt(4) * k @ k.transpose(-1, -2), dim=-1)
    assert (_recall("softmax_attention", k, v) - w @ v).abs().max() < 1e-6


def test_mqar_cli_saves_as_it_goes_and_continues(tmp_path, capsys):
    """A second call finds every run finished and trains nothing; another sweep's file is refused."""
    import json

    from ttr.cli import main

    out = tmp_path / "mqar"
    args = ["mqar", "--memories", "softmax_attention,deltanet", "--steps", "10", "--jobs", "2", "--out", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted((r["memory"], r["conv"]) for r in rows) == [("deltanet", True), ("softmax_attention", False),
                                                             ("softmax_attention", True)]
    assert (out / "mqar_state_size.png").stat().st_size > 0 and (out / "results.csv").exists()
    before = (out / "results.json").read_text()
    assert main(args) == 0 and (out / "results.json").read_text() == before
    capsys.readouterr()
    assert main(["mqar", "--memories", "softmax_attention,deltanet", "--steps", "20", "--out", str(out)]) == 2
    assert "holdsanothersweep'sresults" in "".join(capsys.readouterr().out.split())  # as rich wraps it or not


def _row(memory, conv, acc, floats=1024):
    return {"memory": memory, "conv": conv, "d_model": 64, "seq_len": 32, "kv_pairs": 4, "lr": 3e-3,
            "accuracy": acc, "state_floats": floats}


def test_report_verdicts_follow_the_numbers():
    from ttr.experiments.report import claim_a, claim_b

    held = [_row("mesa", True, 0.99), _row("mesa", False, 0.1), _row("softmax_attention", True, 1.0),
            _row("softmax_attention", False, 0.05)]
    assert claim_a(held).startswith("(a) reproduced:")
    assert claim_a(held[:1] + [_row("mesa", False, 0.8)] + held[2:]).startswith("(a) reproduced for 1 of 2")
    assert claim_a([_row("mesa", True, 0.5), _row("mesa", False, 0.4)]).startswith("(a) not reproduced")
    assert "fixed-state memories below it: gla 0.60 at 512 floats" in claim_b(held + [_row("gla", True, 0.6, 512)])
    assert claim_b(held).startswith("(b) not shown at this setting")


def test_mqar_models_start_their_scalar_gates_remembering_long():
    """Mamba-2's published dt range forgets within ~12 tokens at initialization; the MQAR models start in
    [1e-4, 1e-3] (ttr.experiments.mqar.MQAR_DT_RANGE), and TTRLayer takes any range."""
    import ttr

    dt = torch.nn.functional.softplus(mqar_model(32, 32, "mamba2").blocks[0].layer.inputs["g"].dt_bias)
    assert bool(((dt >= 1e-4 * 0.999) & (dt <= 1e-3 * 1.001)).all())
    dt = torch.nn.functional.softplus(ttr.TTRLayer(32, 2, "gated_deltanet").inputs["g"].dt_bias)
    assert bool(((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all())
    with pytest.raises(ValueError, match="dt_range must be"):
        ttr.TTRLayer(32, 2, "mamba2", dt_range=(0.1, 1e-3))


def test_a_mixed_sweep_trains_one_model_on_every_setting_and_tests_longer(tmp_path):
    """Zoology's protocol: one model per cell on the mixture of training settings (shorter ones padded with
    ignored labels), tested on its test settings, its accuracy their mean; every test setting a CSV column."""
    from ttr.experiments import mqar

    sweep = mqar.Sweep(memories=("softmax_attention",), no_conv=(), d_models=(32,), settings=((16, 2), (32, 4)),
                       lrs=(3e-3,), vocab_size=32, steps=5, batch_size=8, n_train=256, n_test=32, mixed=True,
                       test_settings=((16, 2), (64, 8)))
    (x, y), _ = sweep.data(sweep.runs()[0])
    assert x.shape == (256, 32) and bool((y[:128, 16:] == -100).all())  # the (16, 2) half, padded to 32
    [row] = [mqar.train_one(sweep, run, None) for run in sweep.runs()]
    assert set(row["tests"]) == {"16/2", "64/8"}
    assert row["accuracy"] == pytest.approx(sum(row["tests"].values()) / 2)
    mqar.save(tmp_path, "mixed", sweep, [row])
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert "test 64/8" in header and len((tmp_path / "results.csv").read_text().splitlines()[1].split(",")) == len(header)


def test_report_reads_claim_b_off_the_pair_counts():
    from ttr.experiments.report import claim_b

    def tested(memory, few, most):
        return {**_row(memory, True, most), "tests": {"32/1": few, "32/8": most}}

    rows = [tested("softmax_attention", 1.0, 0.99), tested("gla", 0.95, 0.70), tested("mesa", 0.99, 0.97)]
    assert claim_b(rows).startswith("(b) reproduced at one state size per memory")
    assert "gla 0.95 -> 0.70 (1024 floats)" in claim_b(rows)
    flat = [tested("softmax_attention", 1.0, 0.99), tested("gla", 0.95, 0.94)]
    assert claim_b(flat).startswith("(b) not reproduced")
    # a fixed state large enough for the pairs keeps up: named with its size, the claim holds in part
    big = {**tested("rebased", 1.0, 1.0), "state_floats": 9248}
    window = tested("sliding_window", 0.99, 0.99)  # a cache of the last 64 tokens: all of them here
    part = claim_b(rows + [big, window, tested("deltanet", 0.97, 0.80)])
    assert part.startswith("(b) reproduced in part") and "keep up with the caches, rebased (9248 floats)" in part
    assert "sliding_window" not in part.split("lose a median")[1]


def test_a_diverging_run_is_a_row_of_the_sweep_not_its_end():
    """A learning rate too large for a memory is a finding of the sweep: the run is recorded with accuracy 0 and
    its error, and the other runs go on."""
    from ttr.experiments import mqar

    sweep = mqar.Sweep(memories=("linear_attention",), no_conv=(), d_models=(32,), settings=((16, 2),),
                       lrs=(1e6,), vocab_size=32, steps=20, batch_size=8, n_train=64, n_test=16)
    [row] = [mqar.train_one(sweep, run, None) for run in sweep.runs()]
    assert row["accuracy"] == 0.0 and "not finite" in row["error"] and row["state_floats"] > 0
