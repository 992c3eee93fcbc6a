"""Trust policy of the forward solvers and the ITD / stochastic entry points.

fixed_point_solve (Picard, Anderson) and nn.DEQ: NaN/Inf → SolverError, a growing absolute
residual → NotContractionError, an unconverged solve → one ConvergenceWarning (never with
tol=0).  newton_cg / lbfgs: unconverged → ConvergenceWarning; options refuse bools and inf.
sid / StochasticBilevel / forward_hypergrad / ITDBilevel: an hparams leaf that reaches
nothing is named (ValueError), a legitimate exact zero is not.  float64 throughout.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from problems import rel_err, ridge

import bilevel as bl
from bilevel import prox

F64 = torch.float64
P = ridge()  # g = ½‖Xw − y‖²/n + ½ Σ e^λ w², exact hypergradient known
ETA = 0.5 / torch.linalg.eigvalsh(torch.func.hessian(P.inner_loss)(P.params, P.hparams)).max().item()
W0 = torch.zeros_like(P.params)


def _warnings(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in got if issubclass(w.category, bl.ConvergenceWarning)]


# ----------------------------------------------------------------------------- fixed_point_solve


@pytest.mark.parametrize("solver", [bl.Picard(maxiter=200), bl.Anderson(maxiter=3, memory=2)], ids=repr)
def test_slow_honest_contraction_only_warns(solver):
    # z ↦ 0.999 z + 1: a contraction whose residual decreases by 0.1% a step
    (z, info), got = _warnings(lambda: bl.fixed_point_solve(lambda z: 0.999 * z + 1, torch.zeros(3, dtype=F64),
                                                            solver))
    assert not info.converged and len(got) == 1
    assert f"fixed_point_solve: {type(solver).__name__} stopped after" in str(got[0].message)
    assert torch.isfinite(z).all()


def test_tol_zero_never_warns():
    (_, info), got = _warnings(lambda: bl.fixed_point_solve(lambda z: 0.999 * z + 1, torch.zeros(3, dtype=F64),
                                                            bl.Picard(maxiter=50, tol=0.0)))
    assert info.iterations == 50 and not got


def test_converged_solve_is_silent():
    (z, info), got = _warnings(lambda: bl.fixed_point_solve(lambda z: 0.5 * z + 1, torch.zeros(3, dtype=F64),
                                                            bl.Picard(maxiter=200, tol=1e-12)))
    assert info.converged and not got and torch.allclose(z, torch.full((3,), 2.0, dtype=F64))


@pytest.mark.parametrize("rate", [2.0, 1.05])
def test_diverging_picard_raises(rate):
    # 2z + 1 blows up (×1e6 within 50 evaluations); 1.05z + 1 grows ×131 in 100: still rising
    with pytest.raises(bl.NotContractionError, match=r"fixed_point_solve: Picard diverged.*‖f\(z\) − z‖"):
        bl.fixed_point_solve(lambda z: rate * z + 1, torch.zeros(3, dtype=F64), bl.Picard(maxiter=100))


def test_diverging_picard_raises_with_tol_zero():
    with pytest.raises(bl.NotContractionError):
        bl.fixed_point_solve(lambda z: 2 * z + 1, torch.zeros(3, dtype=F64), bl.Picard(maxiter=50, tol=0.0))


def test_anderson_reaches_the_repelling_fixed_point_of_a_linear_map():
    # not a contraction, but Anderson solves z = 2z + 1 (z = −1): no error, no warning
    (z, info), got = _warnings(lambda: bl.fixed_point_solve(lambda z: 2 * z + 1, torch.zeros(3, dtype=F64),
                                                            bl.Anderson(tol=1e-12)))
    assert info.converged and not got and torch.allclose(z, -torch.ones(3, dtype=F64))


def test_one_diverging_row_of_a_batch_raises():
    rates = torch.tensor([[0.5], [1.5], [0.9]], dtype=F64)
    with pytest.raises(bl.NotContractionError):
        bl.fixed_point_solve(lambda z: rates * z + 1, torch.zeros(3, 2, dtype=F64), bl.Picard(maxiter=60),
                             batched=True)


def test_one_diverging_task_under_vmap_raises():
    rates = torch.tensor([0.5, 1.5, 0.9], dtype=F64)

    def one(r):
        return bl.fixed_point_solve(lambda z: r * z + 1, torch.zeros(2, dtype=F64), bl.Picard(maxiter=60))[0]

    with pytest.raises(bl.NotContractionError):
        torch.func.vmap(one)(rates)
    ok = torch.func.vmap(one)(torch.tensor([0.5, 0.2], dtype=F64))
    assert torch.allclose(ok, (1 / (1 - torch.tensor([0.5, 0.2], dtype=F64)))[:, None].expand(2, 2))


@pytest.mark.parametrize("solver", [bl.Picard(), bl.Anderson()], ids=repr)
def test_nan_map_raises_solver_error(solver):
    with pytest.raises(bl.SolverError, match=r"NaN or Inf in fn\(z\) after 1 evaluations"):
        bl.fixed_point_solve(lambda z: z * math.nan, torch.zeros(3, dtype=F64), solver)


def test_nan_in_one_row_of_a_batch_raises():
    c = torch.tensor([[1.0], [math.nan]], dtype=F64)
    with pytest.raises(bl.SolverError, match="NaN"):
        bl.fixed_point_solve(lambda z: 0.5 * z + c, torch.zeros(2, 3, dtype=F64), bl.Anderson(), batched=True)


def test_nan_z0_is_refused():
    with pytest.raises(ValueError, match="z0 contains NaN"):
        bl.fixed_point_solve(lambda z: 0.5 * z, torch.full((3,), math.nan, dtype=F64), bl.Picard())


@pytest.mark.parametrize("make,word", [
    (lambda: bl.Picard(maxiter=True), "maxiter"),
    (lambda: bl.Picard(maxiter=2.0), "maxiter"),
    (lambda: bl.Picard(tol=math.inf), "tol"),
    (lambda: bl.Anderson(maxiter=0), "maxiter"),
    (lambda: bl.Anderson(memory=True), "memory"),
    (lambda: bl.Anderson(mixing=True), "mixing"),
    (lambda: bl.Anderson(mixing=1.5), "mixing"),
    (lambda: bl.Anderson(mixing=0.0), "mixing"),
    (lambda: bl.Anderson(regularization=True), "regularization"),
    (lambda: bl.Anderson(regularization=math.nan), "regularization"),
    (lambda: bl.Anderson(regularization=-1.0), "regularization"),
    (lambda: bl.lbfgs(P.inner_loss, W0, P.hparams, maxiter=True), "maxiter"),
    (lambda: bl.lbfgs(P.inner_loss, W0, P.hparams, history=True), "history"),
    (lambda: bl.lbfgs(P.inner_loss, W0, P.hparams, tol=math.nan), "tol"),
    (lambda: bl.newton_cg(P.inner_loss, W0, P.hparams, maxiter=1.0), "maxiter"),
    (lambda: bl.newton_cg(P.inner_loss, W0, P.hparams, tol=math.inf), "tol"),
    (lambda: bl.newton_cg(P.inner_loss, W0, P.hparams, cg_maxiter=True), "cg_maxiter"),
    (lambda: bl.newton_cg(P.inner_loss, W0, P.hparams, cg_maxiter=0), "cg_maxiter"),
])
def test_bad_numeric_options_are_refused(make, word):
    with pytest.raises(ValueError, match=word):
        make()


# ----------------------------------------------------------------------------- DEQ


class _Cell(torch.nn.Module):
    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.W = torch.nn.Parameter(W)

    def forward(self, z, x):
        return z @ self.W.T + x


def _cell(norm: float) -> _Cell:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 4, generator=g, dtype=F64)
    return _Cell(norm * M / torch.linalg.matrix_norm(M, ord=2))


def test_deq_unconverged_forward_warns_once_with_its_context():
    deq = bl.nn.DEQ(_cell(0.9), solver=bl.Picard(maxiter=3))
    x = torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    _, got = _warnings(lambda: deq(x))
    assert len(got) == 1, [str(w.message) for w in got]
    msg = str(got[0].message)
    assert msg.startswith("DEQ forward: Picard stopped after 3 iterations") and "implicit gradient" in msg
    assert deq.forward_info.converged is False


def test_deq_nan_cell_output_raises():
    deq = bl.nn.DEQ(_cell(0.5))
    x = torch.full((2, 4), math.inf, dtype=F64)
    with pytest.raises((ValueError, bl.SolverError), match="NaN"):
        deq(x)


# ----------------------------------------------------------------------------- newton_cg, lbfgs


@pytest.mark.parametrize("name", ["newton_cg", "lbfgs"])
def test_inner_solver_unconverged_warns_and_converged_is_silent(name):
    fn = getattr(bl, name)
    (_, info), got = _warnings(lambda: fn(P.inner_loss, W0, P.hparams, maxiter=1))
    assert not info.converged and len(got) == 1 and str(got[0].message).startswith(f"{name}: ")
    (w, info), got = _warnings(lambda: fn(P.inner_loss, W0, P.hparams))
    assert info.converged and not got and rel_err(w, P.params) <= 1e-8
    (_, info), got = _warnings(lambda: fn(P.inner_loss, W0, P.hparams, maxiter=1, tol=0.0))
    assert not info.converged and not got  # tol=0: exactly maxiter steps asked for


# ----------------------------------------------------------------------------- unused hparams leaves

H_UNUSED = {"lam": P.hparams, "unused": torch.ones(2, dtype=F64)}


def _inner(w, h):
    return P.inner_loss(w, h["lam"])


def _outer(w, h):
    return P.outer_loss(w, h["lam"])


def _step(w, h):
    return w - ETA * torch.func.grad(_inner)(w, h)


def test_sid_fixed_point_form_with_several_hparam_batches_names_the_leaf():
    with pytest.raises(ValueError, match=r"\['unused'\]"):
        bl.sid(lambda w, h, b: _outer(w, h), W0, H_UNUSED, [None], fixed_point=lambda w, h, b: _step(w, h),
               inner_steps=5, linear_steps=5, hparam_batches=3)


def test_sid_legit_zero_passes():
    # 'zero' reaches the inner loss through zero², whose derivative at 0 is exactly 0
    h = {"lam": P.hparams, "zero": torch.zeros(2, dtype=F64)}

    def inner(w, h, b):
        return P.inner_loss(w, h["lam"]) + (h["zero"] ** 2).sum() * (w**2).sum()

    hg = bl.sid(lambda w, h, b: _outer(w, h), W0, h, [None], inner_loss=inner, inner_steps=5, linear_steps=5,
                inner_step_size=ETA, linear_step_size=ETA)
    assert torch.equal(hg["zero"], torch.zeros(2, dtype=F64)) and bool(hg["lam"].any())


def test_forward_hypergrad_legit_zero_passes_and_keeps_the_random_stream():
    def step(w, h):  # a random step: the check must leave the caller's random stream alone
        noise = 1e-3 * torch.randn(w.shape, dtype=F64)
        return w - ETA * torch.func.grad(_inner)(w, h) + (h["zero"] ** 2).sum() * w + noise

    def run(zero):
        torch.manual_seed(0)
        hg = bl.forward_hypergrad(_outer, step, W0, {"lam": P.hparams, "zero": zero}, 5)
        return hg, torch.randn(3, dtype=F64)

    hg, after = run(torch.zeros(2, dtype=F64))  # exact zero: the leaf search runs
    hg_ref, after_ref = run(torch.full((2,), 1e-300, dtype=F64))  # tiny, nonzero: it does not
    assert torch.equal(hg["zero"], torch.zeros(2, dtype=F64))
    assert torch.equal(after, after_ref) and torch.allclose(hg["lam"], hg_ref["lam"])


def test_forward_hypergrad_indexed_schedule_leaf_used_at_one_step():
    # hparams 'late' is used only at step t = 3, with an exact-zero derivative there: legit
    h = {"lam": P.hparams, "late": torch.zeros(2, dtype=F64), "unused": torch.ones(2, dtype=F64)}

    def step(w, h, t):
        out = w - ETA * torch.func.grad(_inner)(w, h)
        return out * (1 + (h["late"] ** 2).sum()) if t == 3 else out

    with pytest.raises(ValueError, match=r"\['unused'\]") as err:
        bl.forward_hypergrad(_outer, step, W0, h, 5, indexed=True)
    assert "late" not in str(err.value)
    del h["unused"]
    hg = bl.forward_hypergrad(_outer, step, W0, h, 5, indexed=True)
    assert torch.equal(hg["late"], torch.zeros(2, dtype=F64))


def test_forward_hypergrad_nan_iterate_raises():
    with pytest.raises(bl.SolverError, match="NaN or Inf in w_T"):
        bl.forward_hypergrad(P.outer_loss, lambda w, lam: w * math.inf + lam.sum(), W0, P.hparams, 3)


def test_forward_hypergrad_matches_the_exact_hypergradient_still():
    hg = bl.forward_hypergrad(P.outer_loss, P.step, W0, P.hparams, 400)
    assert rel_err(hg, P.exact) <= 1e-8


def test_itd_bilevel_legit_zero_passes():
    h = {"lam": P.hparams, "zero": torch.zeros(2, dtype=F64)}

    def outer(w, h):
        return P.outer_loss(w, h["lam"]) + (h["zero"] ** 2).sum()

    state, infos = bl.ITDBilevel(outer, W0, inner_loss=_inner, inner_steps=5, inner_step_size=ETA).run(h, 1)
    assert torch.equal(state.hparams["zero"], torch.zeros(2, dtype=F64)) and math.isfinite(infos[0].hypergrad_norm)


# ----------------------------------------------------------------------------- info under vmap


def test_sid_and_nsid_return_info_under_vmap():
    lams = torch.stack([P.hparams, P.hparams + 0.1, P.hparams - 0.1])

    def sid_task(lam):
        return bl.sid(lambda w, lam, b: P.outer_loss(w, lam), W0, lam, [None],
                      inner_loss=lambda w, lam, b: P.inner_loss(w, lam), inner_steps=20, linear_steps=20,
                      inner_step_size=ETA, linear_step_size=ETA, return_info=True)

    hg, info = torch.func.vmap(sid_task)(lams)
    assert isinstance(info, bl.SIDInfo) and info.params.shape == (3, 8) and info.v.shape == (3, 8)
    assert info.linear_residual.shape == (3,) and info.outer_loss.shape == (3,)
    for k in range(3):
        hk, ik = sid_task(lams[k])
        assert rel_err(hg[k], hk) <= 1e-12 and rel_err(info.v[k], ik.v) <= 1e-12
        assert abs(float(info.outer_loss[k]) - ik.outer_loss) <= 1e-12 * abs(ik.outer_loss)
    # inner_steps=0: w = params0 and the outer loss do not depend on the task (an unbatched
    # value, which vmap can only return as a tensor)
    hg0, info0 = torch.func.vmap(lambda lam: bl.sid(
        lambda w, lam, b: P.outer_loss(w, lam), P.params, lam, [None],
        inner_loss=lambda w, lam, b: P.inner_loss(w, lam), inner_steps=0, linear_steps=20, inner_step_size=ETA,
        linear_step_size=ETA, return_info=True))(lams)
    assert info0.outer_loss.shape == (3,) and torch.equal(info0.outer_loss, info0.outer_loss[:1].expand(3))

    # NSID on a lasso-like composite map: one prox-gradient step of the ridge data term
    X, y = torch.randn(30, 8, dtype=F64, generator=torch.Generator().manual_seed(3)), torch.randn(30, dtype=F64)
    L = torch.linalg.eigvalsh(X.T @ X / 30).max().item()
    cm = bl.proximal_gradient_composite(lambda w, lam, b: 0.5 * ((b[0] @ w - b[1]) ** 2).mean(),
                                        lambda u, lam, eta: prox.soft_threshold(u, eta * lam.exp()), 1 / L)
    w = torch.zeros(8, dtype=F64)
    w[:3] = torch.tensor([1.0, -0.5, 0.3], dtype=F64)

    def nsid_task(lam):
        return bl.nsid(lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.01 * lam**2, w, lam, [(X, y)],
                       fixed_point=cm, mean_batch=(X, y), steps=20, step_size=0.5, return_info=True)

    lam3 = torch.tensor([-3.0, -2.5, -2.0], dtype=F64)
    hg, info = torch.func.vmap(nsid_task)(lam3)
    assert isinstance(info, bl.NSIDInfo) and info.v.shape == (3, 8) and info.inner_residual.shape == (3,)
    for k in range(3):
        hk, ik = nsid_task(lam3[k])
        assert rel_err(hg[k], hk) <= 1e-12 and rel_err(info.v[k], ik.v) <= 1e-12
