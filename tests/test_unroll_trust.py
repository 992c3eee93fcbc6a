"""Trust policy of `unroll` / `forward_hypergrad`: no silent wrong numbers.

Stochastic steps under checkpointing and forward mode, torch.func transforms (vmap,
grad, jacrev, jacfwd, hessian), per-step output checks, steps/truncate with no path from
hparams to w_T, non-differentiable steps, and forward mode's own derivative.
"""

import pytest
import torch
from problems import logistic, rel_err, ridge

import bilevel as bl

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest: tiny problems

N, D, B = 40, 5, 8


def _minibatch_problem(seed=0):
    """Ridge by SGD on minibatches drawn with torch.randint: a stochastic step."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randn(N, generator=g, dtype=torch.float64)
    Xv = torch.randn(N, D, generator=g, dtype=torch.float64)
    yv = torch.randn(N, generator=g, dtype=torch.float64)

    def step(w, lam):
        idx = torch.randint(0, N, (B,))
        Xb, yb = X[idx], y[idx]
        return w - 0.1 * (Xb.T @ (Xb @ w - yb) / B + lam.exp() * w)

    def outer(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    lam = torch.linspace(-2, -0.5, D, dtype=torch.float64)
    return step, outer, lam, torch.zeros(D, dtype=torch.float64)


def _reverse_grad(step, outer, lam0, w0, steps, seed, **kw):
    torch.manual_seed(seed)
    lam = lam0.clone().requires_grad_()
    return torch.autograd.grad(outer(bl.unroll(step, w0, lam, steps, **kw), lam), lam)[0]


def _close(a, b, tol):
    return (a - b).abs().max() <= tol * b.abs().max()


# ----------------------------------------------------------------------------- 1. RNG replay


@pytest.mark.parametrize("steps", [7, 30])
def test_checkpoint_replays_minibatch_sampling(steps):
    step, outer, lam, w0 = _minibatch_problem()
    plain = _reverse_grad(step, outer, lam, w0, steps, seed=5)
    ckpt = _reverse_grad(step, outer, lam, w0, steps, seed=5, checkpoint=True)
    assert _close(ckpt, plain, 1e-12), (ckpt - plain).abs().max()
    other_seed = _reverse_grad(step, outer, lam, w0, steps, seed=6)
    assert not _close(other_seed, plain, 1e-6)  # the draws matter: the test can see a wrong replay


def test_checkpoint_replays_dropout_and_leaves_the_callers_stream_alone():
    g = torch.Generator().manual_seed(1)
    A = 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)

    def step(w, lam):
        return torch.tanh(A @ torch.nn.functional.dropout(w, 0.3, training=True) + lam)

    def run(checkpoint):
        torch.manual_seed(3)
        lam = torch.linspace(0.1, 0.6, 6, dtype=torch.float64, requires_grad=True)
        wT = bl.unroll(step, torch.ones(6, dtype=torch.float64), lam, 16, checkpoint=checkpoint)
        (gr,) = torch.autograd.grad((wT**2).sum(), lam)
        return gr, torch.rand(3, dtype=torch.float64)  # the stream after the backward pass

    (g_plain, after_plain), (g_ckpt, after_ckpt) = run(False), run(True)
    assert _close(g_ckpt, g_plain, 1e-12)
    assert torch.equal(after_ckpt, after_plain)


# ----------------------------------------------------------------------------- 2. transforms


def test_checkpointed_unroll_under_vmap_equals_loop():
    p = ridge()
    lams = torch.stack([p.hparams, p.hparams + 0.2, p.hparams - 0.3])

    def F(lam):
        return p.outer_loss(bl.unroll(p.step, p.params0, lam, 25, checkpoint=True), lam)

    batched = torch.func.vmap(F)(lams)
    loop = torch.stack([p.outer_loss(bl.unroll(p.step, p.params0, lam, 25), lam) for lam in lams])
    assert torch.allclose(batched, loop, rtol=1e-13, atol=0)
    # the vmapped gradient of a checkpointed unroll, too
    grads = torch.func.vmap(torch.func.grad(F))(lams)
    loop_grads = torch.stack([torch.func.grad(F)(lam) for lam in lams])
    assert rel_err(grads, loop_grads) < 1e-12


@pytest.mark.parametrize("make", [ridge, logistic], ids=lambda f: f.__name__)
def test_checkpointed_unroll_hessian_equals_plain(make):
    p = make()

    def F(lam, checkpoint):
        return p.outer_loss(bl.unroll(p.step, p.params0, lam, 20, checkpoint=checkpoint), lam)

    H_ckpt = torch.func.hessian(lambda lam: F(lam, True))(p.hparams)
    H_plain = torch.func.hessian(lambda lam: F(lam, False))(p.hparams)
    assert rel_err(H_ckpt, H_plain) < 1e-12
    assert H_plain.abs().max() > 1e-6


@pytest.mark.parametrize("checkpoint", [False, True])
def test_unroll_under_func_grad_and_jacrev(checkpoint):
    # jacrev runs the backward pass of the checkpointed segments under vmap: it returned
    # zeros before; now both equal plain autograd's Jacobian / gradient
    p = logistic()

    def wT(lam):
        return bl.unroll(p.step, p.params0, lam, 15, checkpoint=checkpoint)

    J_ref = torch.autograd.functional.jacobian(lambda lam: bl.unroll(p.step, p.params0, lam, 15), p.hparams)
    J = torch.func.jacrev(wT)(p.hparams)
    assert rel_err(J, J_ref) < 1e-12
    assert rel_err(torch.func.jacfwd(wT)(p.hparams), J_ref) < 1e-12
    g_ref = torch.autograd.functional.jacobian(lambda lam: p.outer_loss(wT(lam), lam), p.hparams)
    g = torch.func.grad(lambda lam: p.outer_loss(wT(lam), lam))(p.hparams)
    assert rel_err(g, g_ref) < 1e-12
    # the plain unroll's Jacobian against float64 central differences
    h, e = 1e-6, torch.zeros_like(p.hparams)
    e[2] = h
    fd = (bl.unroll(p.step, p.params0, p.hparams + e, 15) - bl.unroll(p.step, p.params0, p.hparams - e, 15)) / (2 * h)
    assert torch.allclose(J[:, 2], fd, rtol=1e-6, atol=1e-10)


def test_checkpointed_random_step_under_jacrev_is_a_clear_error():
    step, _, lam, w0 = _minibatch_problem()
    with pytest.raises(ValueError, match="checkpoint=False"):
        torch.func.jacrev(lambda lam_: bl.unroll(step, w0, lam_, 9, checkpoint=True))(lam)
    torch.manual_seed(0)  # the plain unroll records the draws: fine under jacrev
    J = torch.func.jacrev(lambda lam_: bl.unroll(step, w0, lam_, 9))(lam)
    assert J.shape == (D, D) and bool(J.abs().max() > 0)


# ----------------------------------------------------------------------------- 3. every step checked


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize(
    "bad, words",
    [
        (lambda w: w[:-1], "shapes"),
        (lambda w: w.float(), "dtype"),
        (lambda w: (w,), "structure"),
    ],
    ids=["shape", "dtype", "structure"],
)
def test_every_step_output_is_checked(bad, words, checkpoint):
    p = ridge()

    def step(w, lam, t):
        w = p.step(w, lam)
        return bad(w) if t == 3 else w

    lam = p.hparams.detach().requires_grad_()
    with pytest.raises(ValueError, match=rf"step\(params, hparams, t\) at step t=3 .*{words}"):
        bl.unroll(step, p.params0, lam, 10, indexed=True, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="at step t=3"):
        bl.forward_hypergrad(p.outer_loss, step, p.params0, p.hparams, 10, indexed=True)


# ----------------------------------------------------------------------------- 4. no path to hparams


def test_no_step_recorded_is_a_clear_error():
    p = ridge()
    with pytest.raises(ValueError, match=r"steps=0: .*no path from hparams to w_T.*steps should be an int >= 1"):
        bl.unroll(p.step, p.params0, p.hparams, 0)
    with pytest.raises(ValueError, match=r"truncate=0 .*no path from hparams to w_T.*\[1, steps=10\]"):
        bl.unroll(p.step, p.params0, p.hparams, 10, truncate=0)
    with pytest.raises(ValueError, match=r"steps=0: .*no path from hparams"):
        bl.forward_hypergrad(p.outer_loss, p.step, p.params0, p.hparams, 0)
    with pytest.raises(ValueError, match="steps should be an int >= 1"):
        bl.unroll(p.step, p.params0, p.hparams, True)


def _detaching_steps():
    p = ridge()

    def detach(w, lam):
        return p.step(w, lam).detach()

    def data(w, lam):
        return p.step(w, lam.data)

    def no_grad(w, lam):
        with torch.no_grad():
            return p.step(w, lam)

    def item(w, lam):
        return w - 0.1 * (w - lam[0].item())

    return p, {"detach": detach, "data": data, "no_grad": no_grad, "item": item}


@pytest.mark.parametrize("kind", ["detach", "data", "no_grad", "item"])
@pytest.mark.parametrize("options", [{}, {"checkpoint": True}, {"truncate": 4}], ids=["plain", "ckpt", "trunc"])
def test_non_differentiable_step_is_a_clear_error(kind, options):
    p, steps = _detaching_steps()
    lam = p.hparams.detach().requires_grad_()
    with pytest.raises(ValueError, match=r"does not depend on hparams through autograd: it detaches or uses "
                                         r"\.data/\.item\(\)/no_grad"):
        bl.unroll(steps[kind], p.params0, lam, 10, **options)
    # a plain forward computation is legitimate: hparams not requiring grad, or no_grad
    wT = bl.unroll(steps[kind], p.params0, p.hparams, 10, **options)
    assert wT.shape == p.params0.shape and not wT.requires_grad
    with torch.no_grad():
        bl.unroll(steps[kind], p.params0, lam, 10, **options)


# ----------------------------------------------------------------------------- 5. stochastic forward mode


def test_forward_mode_stochastic_step_equals_reverse_mode_same_seed():
    step, outer, lam, w0 = _minibatch_problem()
    torch.manual_seed(11)
    fwd = bl.forward_hypergrad(outer, step, w0, lam, 25)
    rev = _reverse_grad(step, outer, lam, w0, 25, seed=11)
    assert _close(fwd, rev, 1e-10), (fwd - rev).abs().max()


# ----------------------------------------------------------------------------- 6. forward mode's derivative


@pytest.mark.parametrize("make", [ridge, logistic], ids=lambda f: f.__name__)
def test_forward_hypergrad_is_differentiable(make):
    p = make()
    T = 12

    def F(lam):
        return p.outer_loss(bl.unroll(p.step, p.params0, lam, T), lam)

    def fhg(lam):
        return bl.forward_hypergrad(p.outer_loss, p.step, p.params0, lam, T)

    H = torch.func.hessian(F)(p.hparams)
    assert H.abs().max() > 1e-6
    assert _close(torch.func.jacrev(fhg)(p.hparams), H, 1e-8)
    assert _close(torch.func.jacfwd(fhg)(p.hparams), H, 1e-8)
    assert _close(torch.func.grad(lambda lam: fhg(lam).sum())(p.hparams), H.sum(0), 1e-8)
    lam = p.hparams.detach().requires_grad_()
    hg = bl.forward_hypergrad(p.outer_loss, p.step, p.params0, lam, T, create_graph=True)
    (g,) = torch.autograd.grad(hg.sum(), lam)
    assert _close(g, H.sum(0), 1e-8)
    # nothing recorded when not asked for (hparams that are Parameters keep no graph of T steps)
    assert not fhg(lam).requires_grad
    with torch.no_grad():
        assert not bl.forward_hypergrad(p.outer_loss, p.step, p.params0, lam, T, create_graph=True).requires_grad
