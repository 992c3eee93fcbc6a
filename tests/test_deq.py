"""Forward fixed-point solvers, the DEQ layer (gradient vs finite differences) and the digits job."""

import json
import warnings

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.nn import DEQ

F64 = torch.float64


def _linear_map(d=12, q=0.95, seed=0):
    """z = A z + c, A non-symmetric with eigenvalues spread over [−q, q]: z* = (I − A)⁻¹ c."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(d, d, generator=g, dtype=F64)
    A = S @ torch.diag(torch.linspace(-q, q, d, dtype=F64)) @ torch.linalg.inv(S)
    c = torch.randn(4, d, generator=g, dtype=F64)
    exact = torch.linalg.solve(torch.eye(d, dtype=F64) - A, c.T).T
    return A, c, exact


def test_anderson_and_picard_reach_the_exact_fixed_point():
    A, c, exact = _linear_map()
    runs = {}
    for solver in (bl.Anderson(tol=1e-12, maxiter=500), bl.Picard(tol=1e-12, maxiter=2000)):
        z, info = bl.fixed_point_solve(lambda z: z @ A.T + c, torch.zeros_like(c), solver, batched=True)
        assert info.converged and info.residual <= 1e-12
        assert ((z - exact).norm() / exact.norm()) < 1e-10
        runs[info.solver] = info.iterations
    assert runs["Anderson"] * 5 < runs["Picard"], runs  # spectral radius 0.95: Picard needs ~500


def test_batched_equals_one_problem_at_a_time_and_pytrees():
    A, c, exact = _linear_map(seed=1)
    solver = bl.Anderson(tol=1e-13, maxiter=300)
    zb, _ = bl.fixed_point_solve(lambda z: z @ A.T + c, torch.zeros_like(c), solver, batched=True)
    for i in range(len(c)):
        zi, _ = bl.fixed_point_solve(lambda z, i=i: A @ z + c[i], torch.zeros_like(c[i]), solver)
        assert torch.allclose(zi, zb[i], rtol=1e-10, atol=0)
    # a pytree state: (first half, second half) of the same map
    d = A.shape[0] // 2

    def split_map(zs):
        z = torch.cat(zs, 1) @ A.T + c
        return (z[:, :d], z[:, d:])

    zt, info = bl.fixed_point_solve(split_map, (torch.zeros(4, d, dtype=F64),) * 2, solver, batched=True)
    assert info.converged and torch.allclose(torch.cat(zt, 1), exact, rtol=1e-10, atol=0)


def test_forward_solvers_under_vmap_equal_the_loop():
    # under vmap the stopping test reads every row: it stops at tol like the loop
    A, c, exact = _linear_map(seed=2)
    for solver in (bl.Anderson(tol=1e-12, maxiter=80), bl.Picard(tol=1e-12, maxiter=1500)):
        def one(ci, solver=solver):
            return bl.fixed_point_solve(lambda z: A @ z + ci, torch.zeros_like(ci), solver)[0]

        batched, looped = torch.func.vmap(one)(c), torch.stack([one(ci) for ci in c])
        # both stop at tol (error ≈ cond(I − A)·tol ≈ 2e-11)
        assert ((batched - looped).norm() / looped.norm()) < 1e-9
        assert ((batched - exact).norm() / exact.norm()) < 1e-9


def test_fixed_point_solve_bad_input():
    A, c, _ = _linear_map()
    with pytest.raises(ValueError, match="structure and shapes of z0"):
        bl.fixed_point_solve(lambda z: z[:, :-1], torch.zeros_like(c), bl.Picard(), batched=True)
    with pytest.raises(TypeError, match="Picard.*Anderson"):
        bl.fixed_point_solve(lambda z: z, torch.zeros(3, dtype=F64), bl.GMRES())
    with pytest.raises(ValueError, match="share its first"):
        bl.fixed_point_solve(lambda z: z, (torch.zeros(3, 2), torch.zeros(4, 2)), bl.Picard(), batched=True)
    with pytest.raises(ValueError, match="memory should be an int"):
        bl.Anderson(memory=0)
    with pytest.raises(ValueError, match="mixing"):
        bl.Anderson(mixing=1.5)


class TinyCell(nn.Module):
    def __init__(self, d, scale=0.6):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=F64)
        self.u = nn.Parameter(torch.randn(d, dtype=F64))
        with torch.no_grad():
            self.lin.weight.mul_(scale / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x * self.u)


def _tiny(backward_solver=None, solver=None):
    torch.manual_seed(0)
    deq = DEQ(TinyCell(3), solver=solver or bl.Anderson(tol=1e-14, maxiter=200),
              backward_solver=backward_solver or bl.GMRES(tol=1e-13))
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    return deq, x


def _loss(z):
    return (z**3).sum() + z[:, 0].sum()


def test_deq_gradient_against_finite_differences():
    deq, x = _tiny()
    _loss(deq(x)).backward()
    assert deq.forward_info.converged and deq.forward_info.residual < 1e-13
    assert deq.backward_info.converged and deq.backward_info.inner_residual < 1e-12
    tensors = [x, *deq.parameters()]
    h = 1e-6
    for t in tensors:
        fd = torch.zeros_like(t)
        for i in range(t.numel()):
            with torch.no_grad():
                t.view(-1)[i] += h
                up = _loss(deq(x)).item()
                t.view(-1)[i] -= 2 * h
                down = _loss(deq(x)).item()
                t.view(-1)[i] += h
            fd.view(-1)[i] = (up - down) / (2 * h)
        assert ((t.grad - fd).norm() / fd.norm()) < 1e-8
    # torch's own check, on x
    assert torch.autograd.gradcheck(lambda x: deq(x), (x.detach().requires_grad_(),))


def test_backward_solvers_agree_and_picard_forward_matches():
    grads = []
    for fwd, bwd in [(None, bl.GMRES(tol=1e-13)), (None, bl.FixedPoint(tol=1e-13, maxiter=500)),
                     (None, bl.Dense()), (bl.Picard(tol=1e-14, maxiter=500), None)]:
        deq, x = _tiny(bwd, fwd)
        _loss(deq(x)).backward()
        grads.append(torch.cat([x.grad.reshape(-1)] + [p.grad.reshape(-1) for p in deq.parameters()]))
    for g in grads[1:]:
        assert ((g - grads[0]).norm() / grads[0].norm()) < 1e-10


def test_no_grad_and_info_attributes():
    deq, x = _tiny()
    with torch.no_grad():
        z = deq(x)
    assert not z.requires_grad and deq.backward_info is None
    assert deq.forward_info.solver == "Anderson" and deq.forward_info.iterations > 1
    assert torch.allclose(deq.cell(z, x), z, rtol=0, atol=1e-12)  # a fixed point


def test_non_converged_forward_warns_with_residual_or_errors():
    deq, x = _tiny(solver=bl.Picard(maxiter=2, tol=1e-10))
    with pytest.warns(bl.ConvergenceWarning, match=r"Picard stopped after 2 iterations with relative residual \d"):
        deq(x)
    assert deq.forward_info.converged is False and deq.forward_info.residual > 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.ConvergenceWarning)
        with pytest.raises(bl.ConvergenceWarning):
            deq(x)


def test_nan_and_misuse():
    deq, x = _tiny()
    with pytest.raises(ValueError, match="hparams contains NaN"):
        deq(x.detach() * float("nan"))
    with pytest.raises(TypeError, match="cell should be an nn.Module"):
        DEQ(lambda z, x: z)
    with pytest.raises(TypeError, match="Anderson.*Picard"):
        DEQ(TinyCell(2), solver=bl.CG())
    with pytest.raises(TypeError, match="solver should be one of"):
        DEQ(TinyCell(2), backward_solver=bl.Anderson())


# ----------------------------------------------------------------- the digits job


def test_deq_digits_quick_run_resume_and_anderson_beats_picard(tmp_path):
    from bilevel.apps import deq_digits
    from bilevel.cli import JOBS

    assert JOBS["deq-digits"].module == "bilevel.apps.deq_digits"
    straight = tmp_path / "straight"
    assert deq_digits.main(["--quick", "--out", str(straight), "--no-progress"]) == 0
    res = json.loads((straight / "results.json").read_text())
    assert res["config"]["epochs"] == 2 and len(res["history"]["test_acc"]) == 2
    assert res["test_acc"] > 0.6  # two short epochs of a tiny model: learning, not yet accurate
    assert max(res["history"]["forward_residual"]) <= res["config"]["forward_tol"]
    # Anderson reaches the fixed point of the trained digits model in fewer iterations
    cmp = res["forward_solvers_on_test_set"]
    assert cmp["anderson"]["converged"] and cmp["picard"]["converged"]
    assert cmp["anderson"]["iterations"] < cmp["picard"]["iterations"], cmp
    # interrupted after one epoch and resumed: the same run
    part = tmp_path / "part"
    deq_digits.main(["--quick", "--epochs", "1", "--out", str(part), "--no-progress"])
    deq_digits.main(["--quick", "--epochs", "2", "--out", str(part), "--no-progress", "--resume"])
    resumed = json.loads((part / "results.json").read_text())
    assert resumed["history"]["train_loss"] == res["history"]["train_loss"]
    assert resumed["test_acc"] == res["test_acc"]
    with pytest.raises(ValueError, match="other settings"):
        deq_digits.main(["--quick", "--seed", "1", "--out", str(part), "--no-progress", "--resume"])
