"""nn.Module workflows: modules as functions of (params, hparams), BatchNorm in inner
problems, torch.optim for the outer step (bilevel.nn.tensors / split / call /
update_stats / set_grad)."""

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.nn import call, set_grad, split, tensors, update_stats

F64 = torch.float64
LAM = 0.3  # ridge penalty of the head


def _net(seed=0, bn=True):
    torch.manual_seed(seed)
    body = [nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh()] if bn else [nn.Linear(4, 6), nn.Tanh()]
    return nn.Sequential(nn.Sequential(*body), nn.Linear(6, 1, bias=False)).to(F64)


def _data(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, 4, generator=g, dtype=F64), torch.randn(n, 4, generator=g, dtype=F64)
    return X, torch.randn(n, generator=g, dtype=F64), Xv, torch.randn(n, generator=g, dtype=F64)


def _problem(net, X, y, Xv, yv):
    """Inner: ridge on the head ('1.weight'); outer: validation MSE; body (with BN) = hparams."""

    def inner_loss(w, lam):
        return 0.5 * ((call(net, (w, lam), X).squeeze(-1) - y) ** 2).mean() + 0.5 * LAM * (w["1.weight"] ** 2).sum()

    def outer_loss(w, lam):
        return 0.5 * ((call(net, (w, lam), Xv).squeeze(-1) - yv) ** 2).mean()

    def solve(lam):  # the head in closed form: (ZᵀZ/n + λI)⁻¹ Zᵀy/n, Z the body's features
        Z = call(net[0], {k[2:]: t for k, t in lam.items()}, X)
        n = Z.shape[0]
        return {"1.weight": torch.linalg.solve(Z.T @ Z / n + LAM * torch.eye(Z.shape[1], dtype=F64), Z.T @ y / n)[None]}

    return inner_loss, outer_loss, solve


def test_tensors_are_views_and_split_divides_them():
    net = _net()
    hp, p = split(tensors(net), "0.")
    assert set(p) == {"1.weight"} and set(hp) == {"0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"}
    assert all(not t.requires_grad for t in hp.values())
    with torch.no_grad():
        net[1].weight.add_(1.0)  # an optimiser step on the module shows in the dict: same storage
    assert torch.equal(p["1.weight"], net[1].weight)
    assert set(tensors(net, buffers=True)) >= {"0.1.running_mean", "0.1.running_var", "0.1.num_batches_tracked"}
    with pytest.raises(ValueError, match="no parameter of Sequential is named 'head.'"):
        tensors(net, "head.")
    with pytest.raises(ValueError, match="selects every name"):
        split(tensors(net), "")


def test_call_refuses_missing_unknown_and_duplicate_names():
    net, X = _net(), torch.randn(5, 4, dtype=F64)
    hp, p = split(tensors(net), "0.")
    with pytest.raises(ValueError, match=r"no tensor given for the parameter\(s\) '1.weight'"):
        call(net, hp, X)
    with pytest.raises(ValueError, match="no parameter or buffer named 'head.w'"):
        call(net, (hp, p, {"head.w": X}), X)
    with pytest.raises(ValueError, match="given twice"):
        call(net, (hp, p, p), X)
    with pytest.raises(TypeError, match="tuple of such dicts"):
        call(net, [X], X)
    assert torch.equal(call(net, (hp, p), X), net(X))


def test_bn_train_mode_hypergrad_equals_finite_differences_and_leaves_running_stats():
    net = _net()
    X, y, Xv, yv = _data()
    inner_loss, outer_loss, solve = _problem(net, X, y, Xv, yv)
    lam = split(tensors(net), "0.")[0]
    before = {k: t.clone() for k, t in net.named_buffers()}
    w = solve(lam)
    hg = bl.hypergrad(outer_loss, w, lam, inner_loss=inner_loss, solver=bl.CG(maxiter=50, tol=1e-13))
    # the running statistics were read by nothing and written by nothing
    for k, t in net.named_buffers():
        assert torch.equal(t, before[k]), k

    def F(lam):
        return outer_loss(solve(lam), lam)

    # the exact hypergradient: autograd through the closed-form head (BN batch statistics included)
    exact = torch.func.grad(F)(lam)
    for k in lam:
        assert torch.allclose(hg[k], exact[k], rtol=1e-9, atol=1e-12), k
    # and central finite differences along a direction
    d = {k: torch.randn_like(t) for k, t in lam.items()}
    eps = 1e-5
    fd = (F({k: lam[k] + eps * d[k] for k in lam}) - F({k: lam[k] - eps * d[k] for k in lam})) / (2 * eps)
    assert abs(sum((hg[k] * d[k]).sum() for k in lam) - fd) <= 1e-7 * abs(fd) + 1e-10
    # BN really used the batch statistics: the eval-mode problem (running statistics as
    # constants) is another function, with another hypergradient
    net.eval()
    hg_eval = bl.hypergrad(outer_loss, solve(lam), lam, inner_loss=inner_loss, solver=bl.CG(maxiter=50, tol=1e-13))
    net.train()
    assert not torch.allclose(hg_eval["0.0.weight"], hg["0.0.weight"])


def test_eval_mode_uses_running_statistics_as_constants():
    net = _net()
    X = torch.randn(7, 4, dtype=F64)
    with torch.no_grad():
        net[0][1].running_mean.copy_(torch.linspace(-1, 1, 6, dtype=F64))
        net[0][1].running_var.fill_(2.0)
    net.eval()
    hp, p = split(tensors(net), "0.")
    expected = net(X)  # the module's own eval-mode forward
    assert torch.equal(call(net, (hp, p), X), expected)
    # passed buffers replace the module's: running statistics as explicit inputs
    stats = {"0.1.running_mean": torch.zeros(6, dtype=F64), "0.1.running_var": torch.ones(6, dtype=F64)}
    assert not torch.allclose(call(net, (hp, p, stats), X), expected)


def test_update_stats_moves_running_statistics_like_one_training_forward():
    net, twin = _net(), _net()
    X = torch.randn(9, 4, dtype=F64)
    net.eval()  # modes are restored afterwards
    update_stats(net, tensors(net), X)
    assert not net.training and not net[0][1].training
    twin.train()
    with torch.no_grad():
        twin(X)
    for (k, a), (_, b) in zip(net.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), k
    assert int(net[0][1].num_batches_tracked) == 1
    with pytest.raises(ValueError, match="are buffers"):
        update_stats(net, tensors(net, buffers=True), X)


def test_call_under_vmap_uses_each_tasks_batch_statistics():
    net = _net()
    Xs = torch.randn(5, 8, 4, dtype=F64)  # 5 tasks of 8 points
    named = tensors(net)
    batched = torch.func.vmap(lambda x: call(net, named, x))(Xs)
    looped = torch.stack([call(net, named, x) for x in Xs])
    assert torch.allclose(batched, looped, rtol=1e-12, atol=1e-14)
    assert int(net[0][1].num_batches_tracked) == 0


def test_vmapped_hypergrad_over_tasks_with_batchnorm_equals_loop():
    net = _net(1)
    tasks = [_data(s) for s in range(3)]
    lam = split(tensors(net), "0.")[0]

    def one(X, y, Xv, yv):
        inner_loss, outer_loss, solve = _problem(net, X, y, Xv, yv)
        return bl.hypergrad(outer_loss, solve(lam), lam, inner_loss=inner_loss, solver=bl.CG(maxiter=20, tol=1e-13))

    stacked = [torch.stack(parts) for parts in zip(*tasks)]
    batched = torch.func.vmap(one)(*stacked)
    for i, task in enumerate(tasks):
        looped = one(*task)
        for k in lam:
            assert torch.allclose(batched[k][i], looped[k], rtol=1e-10, atol=1e-13), (i, k)


def test_set_grad_drives_a_torch_optim_outer_step():
    net = _net()
    X, y, Xv, yv = _data(2)
    inner_loss, outer_loss, solve = _problem(net, X, y, Xv, yv)
    opt = torch.optim.SGD(net[0].parameters(), lr=0.5)
    lam = split(tensors(net), "0.")[0]
    start = {k: t.clone() for k, t in lam.items()}
    hg = bl.hypergrad(outer_loss, solve(lam), lam, inner_loss=inner_loss, solver=bl.CG(maxiter=50, tol=1e-13))
    opt.zero_grad()
    set_grad(net, hg)
    opt.step()
    for k in lam:  # the views in lam follow the module: the new values, p − lr·∇F
        assert torch.allclose(lam[k], start[k] - 0.5 * hg[k], rtol=0, atol=1e-15), k
    opt.zero_grad(set_to_none=False)  # zeroing .grad in place leaves hg alone
    assert any(t.abs().sum() > 0 for t in hg.values())
    set_grad(net, hg)
    set_grad(net, hg, accumulate=True)
    assert torch.allclose(net[0][0].weight.grad, 2 * hg["0.0.weight"])
    with pytest.raises(ValueError, match="no parameter named 'body.w'"):
        set_grad(net, {"body.w": hg["0.0.weight"]})
    with pytest.raises(ValueError, match=r"shape \(6, 4\)"):
        set_grad(net, {"0.0.weight": hg["0.0.bias"]})


def test_a_module_that_writes_its_buffers_is_refused():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.lin(x)

    m = Counter()
    with pytest.raises(RuntimeError, match="wrote its buffer"):
        call(m, tensors(m), torch.randn(3, 2))


def test_unroll_itd_through_a_module_with_batchnorm_matches_autograd():
    # ITD: GD on the head; the unrolled graph goes through the BN batch statistics of the body
    net = _net(3)
    X, y, Xv, yv = _data(3)
    inner_loss, outer_loss, _ = _problem(net, X, y, Xv, yv)
    lam = {k: t.clone().requires_grad_() for k, t in split(tensors(net), "0.")[0].items()}
    w0 = {"1.weight": torch.zeros(1, 6, dtype=F64)}
    grad_w = torch.func.grad(inner_loss)

    def step(w, lam):
        return {k: w[k] - 0.5 * g for k, g in grad_w(w, lam).items()}

    w_T = bl.unroll(step, w0, lam, 20)
    got = torch.autograd.grad(outer_loss(w_T, lam), list(lam.values()))

    def manual(lam):  # the same 20 steps, plain autograd
        w = w0
        for _ in range(20):
            w = step(w, lam)
        return outer_loss(w, lam)

    want = torch.autograd.grad(manual(lam), list(lam.values()))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert int(net[0][1].num_batches_tracked) == 0


def test_instance_norm_with_running_statistics_behaves_like_batchnorm():
    # InstanceNorm passes its running statistics to instance_norm whatever track_running_stats
    # says: in train mode call still normalises with the input's statistics and writes nothing
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 3, 1), nn.InstanceNorm1d(3, affine=True, track_running_stats=True)).to(F64)
    X = torch.randn(4, 2, 5, dtype=F64)
    before = {k: t.clone() for k, t in net.named_buffers()}
    named = tensors(net)
    plain = nn.InstanceNorm1d(3, affine=True).to(F64)  # no running statistics: input statistics only
    plain.load_state_dict(net[1].state_dict(), strict=False)
    assert torch.allclose(call(net, named, X), plain(net[0](X)), rtol=1e-12, atol=1e-14)
    g = torch.func.grad(lambda p: (call(net, p, X) ** 2).mean())(named)
    assert set(g) == set(named)
    batched = torch.func.vmap(lambda x: call(net, named, x))(torch.randn(3, 4, 2, 5, dtype=F64))
    assert batched.shape == (3, 4, 3, 5)
    for k, t in net.named_buffers():
        assert torch.equal(t, before[k]), k
    update_stats(net, named, X)  # and update_stats moves them as one training forward would
    twin = nn.InstanceNorm1d(3, affine=True, track_running_stats=True).to(F64)
    twin.load_state_dict({k[2:]: v for k, v in before.items()}, strict=False)
    with torch.no_grad():
        twin(net[0](X))
    assert torch.equal(net[1].running_mean, twin.running_mean)
    assert torch.equal(net[1].running_var, twin.running_var)


def test_update_stats_refuses_missing_and_unknown_names_as_call_does():
    net, X = _net(), torch.randn(9, 4, dtype=F64)
    hp, p = split(tensors(net), "0.")
    with pytest.raises(ValueError, match=r"no tensor given for the parameter\(s\) '1.weight'"):
        update_stats(net, hp, X)
    with pytest.raises(ValueError, match="no parameter or buffer named 'head.w'"):
        update_stats(net, (hp, p, {"head.w": X}), X)
    with pytest.raises(TypeError, match="should be an nn.Module"):
        update_stats(lambda x: x, (hp, p), X)
    assert int(net[0][1].num_batches_tracked) == 0


def _same(net, own):
    now = dict(net.named_parameters())
    return now.keys() == own.keys() and all(now[k] is own[k] for k in own)


def test_a_shared_submodule_and_a_tied_weight_stay_the_modules_own():
    # one Linear and one BatchNorm applied twice (two paths to one submodule), and a weight tied
    # between two distinct layers: call uses the given tensors everywhere and leaves the module's
    # own Parameters and buffers in place (functional_call(tie_weights=True) swaps a shared
    # slot twice and restores the given tensor: pytorch/pytorch#164759)
    torch.manual_seed(0)
    lin, bn, a, b = nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    b.weight = a.weight
    net = nn.Sequential(lin, bn, nn.Tanh(), lin, bn, a, nn.Tanh(), b).to(F64)
    own = dict(net.named_parameters())
    own_buffers = {k: t.clone() for k, t in net.named_buffers()}
    assert set(own) == {"0.weight", "0.bias", "1.weight", "1.bias", "5.weight"}
    named = {k: torch.randn_like(t) for k, t in own.items()}
    X = torch.randn(6, 3, dtype=F64)

    def by_hand(p, x):
        def lin_bn(h):
            h = h @ p["0.weight"].T + p["0.bias"]
            return torch.nn.functional.batch_norm(h, None, None, p["1.weight"], p["1.bias"], training=True)

        h = lin_bn(torch.tanh(lin_bn(x)))
        return torch.tanh(h @ p["5.weight"].T) @ p["5.weight"].T

    for _ in range(2):
        assert torch.allclose(call(net, named, X), by_hand(named, X), rtol=1e-12, atol=1e-14)
        g = torch.func.grad(lambda p: call(net, p, X).sum())(named)
        want = torch.func.grad(lambda p: by_hand(p, X).sum())(named)
        assert all(torch.allclose(g[k], want[k], rtol=1e-10, atol=1e-12) for k in named)
        assert _same(net, own) and all(type(t) is nn.Parameter for t in own.values())
        assert net[3] is lin and lin.weight is own["0.weight"] and b.weight is a.weight
        for k, t in net.named_buffers():
            assert torch.equal(t, own_buffers[k]), k
    update_stats(net, tensors(net), X)
    assert _same(net, own) and int(bn.num_batches_tracked) == 2  # bn runs twice per pass


def test_deq_cell_with_a_shared_submodule_keeps_its_parameters():
    # the DEQ backward evaluates the cell with functional_call: the cell's Linear, reached by two
    # paths, must still hold its own Parameter afterwards (and receive the gradient)
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.seq = nn.Sequential(self.lin, nn.Tanh())

        def forward(self, z, x):
            return 0.5 * self.seq(z) + x

    torch.manual_seed(0)
    cell = Cell().to(F64)
    weight = cell.lin.weight
    x = torch.randn(3, 4, dtype=F64)
    for _ in range(2):
        deq = bl.nn.DEQ(cell, solver=bl.Anderson(maxiter=100, tol=1e-12), backward_solver=bl.GMRES(tol=1e-12))
        deq(x).sum().backward()
        assert cell.lin.weight is weight and cell.seq[0].weight is weight
    z = bl.nn.DEQ(cell, solver=bl.Anderson(maxiter=100, tol=1e-12))(x).detach()
    # ∂/∂W of Σz*: by the implicit function theorem at the solved z*, against autograd through a long Picard unroll
    zz = torch.zeros_like(x)
    for _ in range(200):
        zz = cell(zz, x)
    (g,) = torch.autograd.grad(zz.sum(), [weight])
    assert torch.allclose(zz, z, atol=1e-10)
    assert torch.allclose(weight.grad / 2, g, rtol=1e-8, atol=1e-10)
