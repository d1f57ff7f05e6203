"""The generic recurrent executor: every combination it runs equals the literal solver (ttr.oracle), hands its state
across calls, packs sequences, and equals the fast op where one exists; every other combination says why not."""

import warnings

import pytest
import torch

import ttr
from ttr.ops import generic

from conftest import max_rel

B, T, H, D = 1, 7, 1, 3
TOL = 1e-9

GRID = generic.grid()
PLANS = {r: generic.classify(r) for r in GRID}
RUNS = [r for r in GRID if PLANS[r].kind == "recurrent"]
CARRIED = [r for r in RUNS if r.causal]  # the whole sequence carries no state
WHOLE = [r for r in RUNS if not r.causal]
SETS = [r for r in GRID if PLANS[r].kind == "chunk" and (not r.causal or r.weights.kind == "uniform"
                                                          and r.weights.window is not None)]
FAST = [r for r in GRID if PLANS[r].kind == "chunk" and not isinstance(r.weights, ttr.ComplexGate) and r not in SETS]
UNDEFINED = [r for r in GRID if PLANS[r].kind == "undefined"]


def _id(r) -> str:
    return r.describe().replace(" ", "")


def make_inputs(recipe, B=B, T=T, seed=0, requires_grad=False):
    """q, k, v and every per-token input the recipe names, float64, in ranges where each optimizer is stable."""
    gen = torch.Generator().manual_seed(seed)
    n = recipe.steps_per_token

    def rand(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    kv_shape = (B, T, H, n, D) if n > 1 else (B, T, H, D)
    k = torch.randn(*kv_shape, generator=gen, dtype=torch.float64) * 0.7
    v = torch.randn(*kv_shape, generator=gen, dtype=torch.float64)
    w = recipe.weights
    gate_shape = {"fixed": (B, T, H), "scalar": (B, T, H), "vector": (B, T, H, D), "entry": (B, T, H, D, D),
                  "complex": (B, T, H, D)}.get(w.kind)
    inputs = {}
    for name in recipe.inputs:
        if name == "g":
            inputs["g"] = rand(*gate_shape, low=-0.5, high=-0.05)
            if w.kind == "fixed":
                inputs["g"] = inputs["g"][:, :1].expand(B, T, H).clone()
        elif name == "beta":
            inputs["beta"] = rand(*((B, T, H, n) if n > 1 and isinstance(recipe.optimizer, ttr.OnlineSGD)
                                    else (B, T, H)), low=0.2, high=0.8)
        elif name == "bonus":
            inputs["bonus"] = rand(H, D, low=0.5, high=1.5)
        elif name == "angle":
            inputs["angle"] = rand(B, T, H, D, high=0.3)
        elif name == "i":
            inputs["i"] = rand(B, T, H, low=-1.0, high=1.0)
        elif name == "momentum":
            inputs["momentum"] = rand(B, T, H, low=0.3, high=0.7)
        else:  # delta, lr, theta
            inputs[name] = rand(B, T, H, low=0.1, high=0.5)
    tensors = [q, k, v, *inputs.values()]
    if requires_grad:
        for x in tensors:
            x.requires_grad_(True)
    return q, k, v, inputs


def mlp_state(recipe, rows=B, seed=3):
    if not isinstance(recipe.regressor, ttr.MLP):
        return None
    gen = torch.Generator().manual_seed(seed)
    hidden = recipe.regressor.expansion * D
    return (torch.randn(rows, H, hidden, D, generator=gen, dtype=torch.float64) * D ** -0.5,
            torch.randn(rows, H, D, hidden, generator=gen, dtype=torch.float64) * hidden ** -0.5)


def test_the_table_classifies_every_combination():
    kinds = {p.kind for p in PLANS.values()}
    assert kinds == {"chunk", "recurrent", "undefined"}  # every well-defined combination runs
    for r, plan in PLANS.items():
        assert r.has_chunk_form == (plan.kind == "chunk")
        if plan.kind != "undefined" and not r.causal:  # the whole sequence: one form, no token by token
            assert r.forms == ("chunk",)
        else:
            assert r.forms == {"chunk": ("chunk", "recurrent"), "recurrent": ("recurrent",)}.get(plan.kind, ())
    for preset in ttr.PRESETS.values():  # every named system keeps its fast op
        assert generic.classify(preset.recipe).kind == "chunk"
        assert preset.recipe.op() is not None


@pytest.mark.parametrize("recipe", RUNS, ids=_id)
def test_executor_equals_the_oracle(recipe):
    q, k, v, inputs = make_inputs(recipe)
    init = mlp_state(recipe)
    o, _ = recipe.op()(q, k, v, **inputs, initial_state=init)
    assert o.dtype == torch.float64
    ref = recipe.oracle(q, k, v, initial_state=init, **inputs)
    assert max_rel(o, ref) < TOL


@pytest.mark.parametrize("recipe", CARRIED, ids=_id)
def test_state_handed_across_calls_and_packing(recipe):
    op = recipe.op()
    q, k, v, inputs = make_inputs(recipe, seed=1)
    init = mlp_state(recipe)
    whole, final = op(q, k, v, **inputs, initial_state=init, output_final_state=True)
    cut = 3
    first = {n: (x if n == "bonus" else x[:, :cut]) for n, x in inputs.items()}
    second = {n: (x if n == "bonus" else x[:, cut:]) for n, x in inputs.items()}
    o1, s1 = op(q[:, :cut], k[:, :cut], v[:, :cut], **first, initial_state=init, output_final_state=True)
    o2, s2 = op(q[:, cut:], k[:, cut:], v[:, cut:], **second, initial_state=s1, output_final_state=True)
    assert max_rel(torch.cat([o1, o2], 1), whole) < TOL
    for a, b in zip(_flat(s2), _flat(final)):
        assert max_rel(a, b) < TOL
    # packed: the two pieces as two sequences, each from the start
    cu = torch.tensor([0, cut, T])
    init2 = None if init is None else tuple(torch.cat([x, x]) for x in init)
    if PLANS[recipe].family == "cache":
        init2 = None
    packed, states = op(q, k, v, **inputs, initial_state=init2, cu_seqlens=cu, output_final_state=True)
    o2_fresh, s2_fresh = op(q[:, cut:], k[:, cut:], v[:, cut:], **second, initial_state=init, output_final_state=True)
    assert max_rel(packed, torch.cat([o1, o2_fresh], 1)) < TOL
    if PLANS[recipe].family == "cache":
        states = states[1]
    else:
        states = _rows(states, 1)
    for a, b in zip(_flat(states), _flat(s2_fresh)):
        assert max_rel(a, b) < TOL


def _flat(state):
    if isinstance(state, ttr.ops.MiniBatchState):
        return [*state.weights, *state.start, torch.as_tensor(state.offset).double()]
    return list(state) if isinstance(state, (tuple, list)) else [state]


def _rows(state, i):
    if isinstance(state, ttr.ops.MiniBatchState):
        return ttr.ops.MiniBatchState(tuple(x[i:i + 1] for x in state.weights), tuple(x[i:i + 1] for x in state.start),
                                      state.offset[i:i + 1])
    if isinstance(state, tuple):
        return tuple(x[i:i + 1] for x in state)
    return state[i:i + 1]


@pytest.mark.parametrize("recipe", FAST, ids=_id)
def test_executor_equals_the_fast_op(recipe):
    """Where a fast op exists, the executor forced on the same recipe gives the same answers."""
    q, k, v, inputs = make_inputs(recipe, seed=2)
    if isinstance(recipe.optimizer, ttr.OnlineSGD) and recipe.regressor.feature_map == "identity":
        k = k / k.norm(dim=-1, keepdim=True)  # the delta rule's contraction check on raw keys
    init = mlp_state(recipe)
    fast, _ = recipe.op()(q, k, v, **inputs, initial_state=init, mode="recurrent")
    mine, _ = generic.executor(recipe)(q, k, v, **inputs, initial_state=init)
    assert max_rel(mine, fast) < TOL


GRADIENT_CASES = [
    ttr.Recipe(ttr.VectorGate(), ttr.Linear(), ttr.BatchGD(steps=2)),
    ttr.Recipe(ttr.EntryGate(), ttr.Linear("elu1"), ttr.BatchGD(steps=2, lr=0.5)),
    ttr.Recipe(ttr.ScalarGate(), ttr.Linear("elu1"), ttr.Exact(ridge=1.0)),
    ttr.Recipe(ttr.ScalarGate(input_gate=True), ttr.LocalConstant("elu1"), ttr.NormalizedGD()),
    ttr.Recipe(ttr.ScalarGate(), ttr.Linear("l2"), ttr.OnlineSGD(step="implicit")),
    ttr.Recipe(ttr.VectorGate(), ttr.Linear("elu1"), ttr.MiniBatchGD(4, momentum=True)),
    ttr.Recipe(ttr.ScalarGate(), ttr.MLP(2), ttr.OnlineSGD()),
    ttr.Recipe(ttr.ScalarGate(), ttr.LocalPolynomial(1), ttr.Exact(ridge=0.1)),
    ttr.Recipe(ttr.ScalarGate(), ttr.RKHS("exp"), ttr.Exact(ridge=1.0)),
    ttr.Recipe(ttr.ScalarGate(), ttr.RKHS("rbf"), ttr.OnlineSGD(step="implicit")),
    ttr.Recipe(ttr.Uniform(), ttr.RKHS("exp"), ttr.MiniBatchGD(2, momentum=True)),
    ttr.Recipe(ttr.Uniform(window=3), ttr.Linear("elu1"), ttr.Exact(ridge=1.0)),
    ttr.Recipe(ttr.Uniform(causal=False), ttr.LocalPolynomial(1), ttr.BatchGD(steps=2, lr=0.5)),
]


@pytest.mark.parametrize("recipe", GRADIENT_CASES, ids=_id)
def test_gradients_equal_the_oracle(recipe):
    assert PLANS.get(recipe, generic.classify(recipe)).kind == "recurrent"
    q, k, v, inputs = make_inputs(recipe, T=5, requires_grad=True)
    init = mlp_state(recipe)
    leaves = [q, k, v, *[x for n, x in inputs.items() if n != "bonus"]]
    w = torch.randn(B, 5, H, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ours = torch.autograd.grad((recipe.op()(q, k, v, **inputs, initial_state=init)[0] * w).sum(), leaves)
    ref = torch.autograd.grad((recipe.oracle(q, k, v, initial_state=init, **inputs) * w).sum(), leaves)
    for a, b in zip(ours, ref):
        assert max_rel(a, b) < 1e-8


@pytest.mark.parametrize("recipe", UNDEFINED[::7], ids=_id)
def test_no_regression_problem_says_why(recipe):
    with pytest.raises(ValueError, match="is not a regression problem: .{20,}"):
        recipe.op()


def test_every_undefined_combination_raises():
    for recipe in UNDEFINED:
        with pytest.raises(ValueError, match="not a regression problem"):
            recipe.op()


def test_chunk_mode_runs_the_recurrence_with_one_notice():
    recipe = ttr.Recipe(ttr.FixedDecay(), ttr.Linear("elu1"), ttr.BatchGD(steps=3, lr=0.3))
    q, k, v, inputs = make_inputs(recipe)
    generic._NOTIFIED.discard(recipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o1, _ = recipe.op()(q, k, v, **inputs, mode="chunk")
        o2, _ = recipe.op()(q, k, v, **inputs, mode="chunk")
    notices = [w for w in caught if "no chunk form" in str(w.message)]
    assert len(notices) == 1 and "batch GD, 3 steps" in str(notices[0].message)
    assert torch.equal(o1, recipe.op()(q, k, v, **inputs)[0]) and torch.equal(o1, o2)


def test_float32_inputs_accumulate_in_float32():
    recipe = ttr.Recipe(ttr.VectorGate(), ttr.Linear("l2"), ttr.OnlineSGD(step="implicit"))
    q, k, v, inputs = make_inputs(recipe)
    o, s = recipe.op()(*(x.float() for x in (q, k, v)), **{n: x.float() for n, x in inputs.items()},
                       output_final_state=True)
    assert o.dtype == s.dtype == torch.float32
    assert max_rel(o, recipe.oracle(q, k, v, **inputs)) < 1e-5


def test_wrong_inputs_are_clear_errors():
    recipe = ttr.Recipe(ttr.ScalarGate(), ttr.Linear("elu1"), ttr.BatchGD(steps=2))
    q, k, v, inputs = make_inputs(recipe)
    with pytest.raises(ValueError, match="takes the inputs"):
        recipe.op()(q, k, v)
    with pytest.raises(ValueError, match="g must have rank 3"):
        recipe.op()(q, k, v, g=torch.zeros(B, T, H, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a regression problem: an online learner's .* window"):
        ttr.Recipe(ttr.Uniform(window=4), ttr.Linear(), ttr.OnlineSGD()).op()


def test_longhorn_with_a_gate_is_gated_deltanet_at_longhorn_step():
    """The derivation in ttr.ops.generic: decay's proximal step, then Longhorn's implicit step, is the gated delta
    rule with beta = delta / (1 + delta ||k||^2) (unit keys: delta / (1 + delta))."""
    recipe = ttr.Recipe(ttr.ScalarGate(), ttr.Linear("l2"), ttr.OnlineSGD(step="implicit"))
    q, k, v, inputs = make_inputs(recipe)
    beta = inputs["delta"] / (1 + inputs["delta"])
    expected, _ = ttr.ops.delta_rule(q, k, v, beta, inputs["g"], qk_l2norm=True)
    assert max_rel(recipe.op()(q, k, v, **inputs)[0], expected) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RUNS, ids=_id)
def test_executor_equals_the_oracle_larger(recipe):
    """Two rows, two heads, 13 tokens (three mini-batches of 4 and a partial one), four channels."""
    global B, H, D
    saved = B, H, D
    B, H, D = 2, 2, 4
    try:
        q, k, v, inputs = make_inputs(recipe, B=2, T=13, seed=5)
        init = mlp_state(recipe, rows=2)
        o, _ = recipe.op()(q, k, v, **inputs, initial_state=init)
        assert max_rel(o, recipe.oracle(q, k, v, initial_state=init, **inputs)) < TOL
    finally:
        B, H, D = saved


def test_zoo_all_lists_every_combination(capsys):
    from ttr.cli import main

    assert main(["zoo", "--all"]) == 0
    out = capsys.readouterr().out
    counts = {kind: sum(p.kind == kind for p in PLANS.values()) for kind in ("chunk", "recurrent", "undefined")}
    assert f"{len(GRID)} combinations: {counts['chunk']} with a chunk form" in out
    assert "recurrent" in out and "mlstm" in out and "not a regression problem" in out


@pytest.mark.parametrize("recipe", SETS, ids=_id)
def test_association_sets_run_on_their_fast_ops_and_equal_the_oracle(recipe):
    """A window or the whole sequence on its fast op equals the literal fit over that set, and so does the executor
    forced on it; a Nystrom span (SOFT, Skyformer) with given landmarks equals its regression over the landmarks' span
    (the executor refuses it)."""
    q, k, v, inputs = make_inputs(recipe, T=9, seed=3)
    if isinstance(recipe.regressor, ttr.recipe.Nystrom):
        with pytest.raises(ValueError, match="fast op only"):
            generic.executor(recipe)
    else:
        mine, _ = generic.executor(recipe)(q, k, v, **inputs)
        assert max_rel(mine, recipe.oracle(q, k, v, **inputs)) < TOL
    kw = {}
    if isinstance(recipe.regressor, ttr.recipe.Nystrom):
        kw = {"landmarks": torch.randn(B, 4, H, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
              "newton_steps": None, "ridge": 0.01}
    ours, _ = recipe.op()(q, k, v, **inputs, **kw)
    truth = recipe.oracle(q, k, v, **inputs, **({"landmarks": kw["landmarks"]} if kw else {}))
    assert max_rel(ours, truth) < TOL
    if recipe.causal:
        recurrent, _ = recipe.op()(q, k, v, **inputs, mode="recurrent")
        assert max_rel(recurrent, truth) < TOL


@pytest.mark.parametrize("recipe", WHOLE, ids=_id)
def test_whole_sequence_packs_and_carries_no_state(recipe):
    """Each packed sequence is its own whole set; no state goes in or out, and no recurrent form exists."""
    op = recipe.op()
    q, k, v, inputs = make_inputs(recipe, seed=1)
    cut = 3
    packed, _ = op(q, k, v, cu_seqlens=torch.tensor([0, cut, T]))
    pieces = [op(q[:, a:b], k[:, a:b], v[:, a:b])[0] for a, b in ((0, cut), (cut, T))]
    assert max_rel(packed, torch.cat(pieces, 1)) < TOL
    with pytest.raises(ValueError, match="no state between calls"):
        op(q, k, v, output_final_state=True)
    with pytest.raises(ValueError, match="no recurrent form"):
        op(q, k, v, mode="recurrent")


@pytest.mark.parametrize("recipe", [ttr.Recipe(ttr.Uniform(window=3), ttr.Linear("l2"), ttr.Exact()),
                                    ttr.Recipe(ttr.Uniform(window=3), ttr.LocalPolynomial(1), ttr.Exact(ridge=1.0)),
                                    ttr.Recipe(ttr.Uniform(window=3), ttr.RKHS("rbf"), ttr.BatchGD(steps=2))], ids=_id)
def test_window_fed_token_by_token_equals_the_whole(recipe):
    """A window's state is its last w associations: fed one token at a time, the window equals one call, and the
    state stays w associations long."""
    op = recipe.op()
    q, k, v, _ = make_inputs(recipe, T=8, seed=4)
    whole, final = op(q, k, v, output_final_state=True)
    state, outs = None, []
    for t in range(8):
        o, state = op(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], initial_state=state, output_final_state=True)
        outs.append(o)
    assert max_rel(torch.cat(outs, 1), whole) < TOL
    for a, b in zip(_flat(state), _flat(final)):
        assert a.shape[1 if PLANS.get(recipe, generic.classify(recipe)).family == "cache" else 2] == 3
        assert max_rel(a, b) < TOL


def test_window_statistics_do_not_drift_in_float32():
    """The window's statistics are summed afresh from its ring: large associations that left leave no rounding error
    behind (subtracting them from running sums would leave eps times their size, for good)."""
    recipe = ttr.Recipe(ttr.Uniform(window=8), ttr.Linear(), ttr.Exact(ridge=1.0))
    q, k, v, _ = make_inputs(recipe, T=200, seed=6)
    k = k.clone()
    k[:, :8] *= 100.0
    o, _ = recipe.op()(q.float(), k.float(), v.float())
    assert max_rel(o[:, 16:], recipe.oracle(q, k, v)[:, 16:]) < 1e-5


def test_kernel_lms_implicit_step_is_the_explicit_one_at_its_beta():
    """The derivation in ttr.ops.generic: the proximal step in an RKHS is the functional gradient step with
    beta = delta / (1 + delta Kern(k, k))."""
    recipe = ttr.Recipe(ttr.ScalarGate(), ttr.RKHS("exp"), ttr.OnlineSGD(step="implicit"))
    q, k, v, inputs = make_inputs(recipe)
    kkk = torch.exp((k * k).sum(-1) * D ** -0.5)  # the exp kernel at (k, k), scale D^-1/2
    beta = inputs["delta"] / (1 + inputs["delta"] * kkk)
    explicit = ttr.Recipe(ttr.ScalarGate(), ttr.RKHS("exp"), ttr.OnlineSGD())
    expected, _ = explicit.op()(q, k, v, beta=beta, g=inputs["g"])
    assert max_rel(recipe.op()(q, k, v, **inputs)[0], expected) < TOL


def test_kernel_lms_mini_batch_of_one_is_online_sgd():
    """A mini-batch of one takes each gradient at the newest function: online SGD (TTT with b = 1 is DeltaNet)."""
    recipe = ttr.Recipe(ttr.Uniform(), ttr.RKHS("poly"), ttr.MiniBatchGD(1))
    q, k, v, inputs = make_inputs(recipe)
    expected, _ = ttr.Recipe(ttr.Uniform(), ttr.RKHS("poly"), ttr.OnlineSGD()).op()(q, k, v, beta=inputs["lr"])
    assert max_rel(recipe.op()(q, k, v, **inputs)[0], expected) < TOL
