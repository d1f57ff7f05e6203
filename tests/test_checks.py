"""Value checks: every op names a non-finite q, k or v (most of them only once the answer shows it), and the
switch that turns the checks off (ttr.set_checks, ttr.checks, TTR_CHECKS=0)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ttr
from ttr import ops

from conftest import make_qkv

B, T, H, D = 1, 11, 2, 4


def _rates(value=0.1):
    return torch.full((B, T, H), value, dtype=torch.float64)


_GEN = torch.Generator().manual_seed(2)
MLP_WEIGHTS = (torch.randn(B, H, 8, D, generator=_GEN, dtype=torch.float64),
               torch.randn(B, H, D, 8, generator=_GEN, dtype=torch.float64))


OPS = {
    "linear_attention": lambda q, k, v, m: ops.linear_attention(q, k, v, mode=m),
    "linear_attention_scalar": lambda q, k, v, m: ops.linear_attention(q, k, v, F.logsigmoid(_rates(3.0)), mode=m),
    "linear_attention_vector": lambda q, k, v, m: ops.linear_attention(
        q, k, v, torch.full((B, T, H, D), -0.1, dtype=torch.float64), mode=m, chunk_size=4),
    "linear_attention_normalized": lambda q, k, v, m: ops.linear_attention(q, k, v, feature_map="elu1",
                                                                           normalize=True, mode=m),
    "linear_attention_angle": lambda q, k, v, m: ops.linear_attention(
        q, k, v, torch.full((B, T, H), -0.1, dtype=torch.float64), angle=torch.full((B, T, H, D), 0.1,
                                                                                     dtype=torch.float64), mode=m),
    "mlstm": lambda q, k, v, m: ops.mlstm(q, k, v, _rates(0.5), F.logsigmoid(_rates(3.0)), mode=m),
    "delta_rule": lambda q, k, v, m: ops.delta_rule(q, k, v, _rates(0.5), F.logsigmoid(_rates(3.0)),
                                                    qk_l2norm=True, mode=m),
    "longhorn": lambda q, k, v, m: ops.longhorn(q, k, v, _rates(0.5), qk_l2norm=True, mode=m),
    "longhorn_raw_keys": lambda q, k, v, m: ops.longhorn(q, k, v, _rates(0.5), mode=m),
    "ttt_linear": lambda q, k, v, m: ops.ttt_linear(q, k, v, _rates(), batch_size=4, qk_l2norm=True, mode=m),
    "ttt_mlp": lambda q, k, v, m: ops.ttt_mlp(q, k, v, _rates(), initial_state=MLP_WEIGHTS, batch_size=4,
                                              qk_l2norm=True, mode=m),
    "titans": lambda q, k, v, m: ops.titans(q, k, v, _rates(), _rates(0.5), batch_size=4, qk_l2norm=True, mode=m),
    "mesa": lambda q, k, v, m: ops.mesa(q, F.normalize(k, dim=-1), v, lamb=1.0, mode=m),
    "kernel_regression": lambda q, k, v, m: ops.kernel_regression(q, k, v, mode=m),
    "softmax": lambda q, k, v, m: ops.local_polynomial_attention(q, k, v, mode=m),
    "local_linear": lambda q, k, v, m: ops.local_polynomial_attention(q, k, v, order=1, mode=m),
}


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("arg", ["q", "k", "v"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_a_non_finite_input_is_named(op, arg, value, mode):
    q, k, v = make_qkv(B, T, H, D, D)
    bad = {"q": q, "k": k, "v": v}
    bad[arg] = bad[arg].index_fill(1, torch.tensor([6]), value)  # one token, in the middle
    with pytest.raises(ValueError, match=f"^{arg} has non-finite values"):
        OPS[op](bad["q"], bad["k"], bad["v"], mode)


def test_checks_off_hand_back_what_they_would_have_refused():
    q, k, v = make_qkv(B, T, H, D, D)
    nan_k = k.index_fill(1, torch.tensor([6]), float("nan"))
    with ttr.checks(False):
        o, _ = ops.linear_attention(q, nan_k, v)
        ops.delta_rule(q, k, v, _rates(3.0), qk_l2norm=True)  # beta past 2: refused with the checks on
    assert o[:, :6].isfinite().all() and o[:, 6:].isnan().all()
    with pytest.raises(ValueError, match="^k has non-finite values"):  # on again after the with block
        ops.linear_attention(q, nan_k, v)
    assert ttr.set_checks(False) is True and ttr.set_checks(True) is False


def test_set_checks_takes_a_bool():
    with pytest.raises(ValueError, match="enabled must be a bool, got 0"):
        ttr.set_checks(0)


def test_the_environment_turns_the_checks_off():
    code = "import ttr._checks as c; print(c.checking())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TTR_CHECKS": "0"}).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------------ torch.compile

GENERIC = ttr.Recipe(ttr.VectorGate(), ttr.Linear(), ttr.BatchGD(steps=2))
_GENERIC_GATE = -0.1 * torch.rand(B, T, H, D, generator=_GEN, dtype=torch.float64)

COMPILED = {
    **OPS,
    "delta_product": lambda q, k, v, m: ops.delta_product(q, torch.stack([k, k.flip(1)], 3), torch.stack([v, v], 3),
                                                          torch.full((B, T, H, 2), 0.5, dtype=torch.float64),
                                                          qk_l2norm=True, mode=m),
    "linear_attention_window": lambda q, k, v, m: ops.linear_attention(q, k, v, F.logsigmoid(_rates(3.0)), window=4,
                                                                       mode=m, chunk_size=4),
    "softmax_window": lambda q, k, v, m: ops.local_polynomial_attention(q, k, v, window=4, mode=m),
    "local_quadratic": lambda q, k, v, m: ops.local_polynomial_attention(q, k, v, order=2, mode=m),
    "local_linear_cg": lambda q, k, v, m: ops.local_polynomial_attention(q, k, v, order=1, mode=m, solver="cg"),
    "soft_attention": lambda q, k, v, m: ops.soft_attention(q, k, v, n_landmarks=4),
    "skyformer": lambda q, k, v, m: ops.skyformer(q, k, v, n_landmarks=4),
    "generic_recurrent": lambda q, k, v, m: GENERIC.op()(q, k, v, g=_GENERIC_GATE),
}
ENCODERS = ("soft_attention", "skyformer")  # non-causal: one form
COMPILE_CASES = [(op, mode) for op in sorted(COMPILED) for mode in ("chunk", "recurrent")
                 if mode == "chunk" or op not in ENCODERS]
FAST_COMPILE_CASES = [("linear_attention_vector", "chunk"), ("delta_rule", "recurrent"), ("delta_rule", "chunk"),
                      ("titans", "chunk"), ("ttt_linear", "chunk")]  # the written-out Functions among them


@pytest.mark.parametrize("op,mode", [
    pytest.param(*case, marks=[] if case in FAST_COMPILE_CASES else [pytest.mark.slow]) for case in COMPILE_CASES])
def test_every_op_compiles_into_one_graph(op, mode):
    """torch.compile(fullgraph=True) traces each form with nothing read back from the device (the checks are
    skipped while it traces), forward and backward, and computes what the op computes. The aot_eager backend
    traces what inductor would compile without generating code, so the test stays quick."""
    torch._dynamo.reset()
    q, k, v = make_qkv(B, T, H, D, D, requires_grad=True)
    weights = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def loss(q, k, v):
        return (COMPILED[op](q, k, v, mode)[0] * weights).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), [q, k, v])
    want = torch.autograd.grad(loss(q, k, v), [q, k, v])
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-9 * (1 + b.abs().max())
