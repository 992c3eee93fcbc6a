"""bilevel run vs-optuna: the --quick run end to end, the hypergradients the gradient method
follows against finite differences, and an interrupted run resumed to the same numbers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("optuna")
pytest.importorskip("sklearn")

from bilevel.apps import vs_optuna as job  # noqa: E402

QUICK = ["--quick", "--no-progress"]


def _finals(res):
    """Every number of the final choices (not the clocks): per problem, method and seed."""
    return {(p, m, i): (s["best_val"], s["evaluations"], s["best_hp"], s["test"])
            for p, pr in res["problems"].items() for m, r in pr["methods"].items() for i, s in enumerate(r["seeds"])}


def test_quick_run(tmp_path, one_thread, capsys):
    assert job.main([*QUICK, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "vs_optuna.png").stat().st_size > 10_000
    assert (tmp_path / job.JOURNAL).is_file()  # the studies, resumable
    assert res["scales"]["best_hp"] == "log"
    cfg = job.Config(**job.QUICK)
    for name, steps in (("demo", cfg.steps_demo), ("enet", cfg.steps_enet)):
        pr = res["problems"][name]
        assert set(pr["methods"]) == set(job.METHODS)
        for r in pr["methods"].values():
            assert len(r["seeds"]) == cfg.seeds
            for s in r["seeds"]:
                assert s["evaluations"] == steps  # the steps budget is exact
                assert math.isfinite(s["best_val"]) and s["best_val"] > 0
                assert min(v for _, v in s["trace"]) == s["best_val"]
                assert all(math.isfinite(v) for v in s["test"].values())
            assert r["curve"]["mean"][-1] == pytest.approx(r["best_val_mean"])
    # problem (a) has one hyperparameter per feature, (b) two
    assert res["problems"]["demo"]["n_hparams"] > 50 and res["problems"]["enet"]["n_hparams"] == 2
    assert "lowest validation loss" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["enet", "demo"])
def test_hypergradient_matches_finite_differences(name, one_thread):
    """The gradient method's ∇F against central differences of the validation loss that the
    Optuna trials evaluate (cold-started inner solves: an independent code path), along ∇F
    itself and along a random direction."""
    pb = job.make_problem(job.Config(**job.QUICK), name, seed=0)
    st = pb.grad_init()
    gen = torch.Generator().manual_seed(0)
    # a point away from the start, where the penalties matter (demo: λ ≈ 0.1–0.3)
    base = torch.full_like(st["hp"], math.log(0.1 if name == "demo" else 0.02))
    st["hp"] = base + torch.rand(st["hp"].shape, generator=gen, dtype=st["hp"].dtype)
    val, hg = pb.hypergrad(st)
    assert val == pytest.approx(pb.val_loss(st["hp"]), rel=1e-6)
    assert float(hg.norm()) > 1e-3  # a test of zeros proves nothing
    # the inner solves stop at max|∇_w g| ≤ 1e-7: steps of 0.03 keep that noise far below the signal
    eps = 0.03 if name == "demo" else 1e-3
    u = torch.randn(st["hp"].shape, generator=gen, dtype=st["hp"].dtype)
    for d in (hg / hg.norm(), u / u.norm()):
        fd = (pb.val_loss(st["hp"] + eps * d) - pb.val_loss(st["hp"] - eps * d)) / (2 * eps)
        assert float(hg @ d) == pytest.approx(fd, rel=1e-3, abs=1e-4 * float(hg.norm())), name


def test_resume_gives_the_same_numbers(tmp_path, monkeypatch, one_thread):
    """Interrupted inside an Optuna study and inside a gradient run, then resumed twice: the
    final choices equal an uninterrupted run's (steps budget: wall clock is not reproducible)."""
    cfg = job.Config(**{**job.QUICK, "seeds": 1})
    full = job.run(cfg, tmp_path / "full", show=False)

    real, calls = job.make_problem, {"n": 0}

    def interrupt_at(k):
        def make(cfg, name, seed, device="cpu"):
            pb = real(cfg, name, seed, device)
            val_loss, hypergrad = pb.val_loss, pb.hypergrad

            def counted(f):
                def g(*a):
                    calls["n"] += 1
                    if calls["n"] == k:
                        raise KeyboardInterrupt
                    return f(*a)
                return g

            return dataclasses.replace(pb, val_loss=counted(val_loss), hypergrad=counted(hypergrad))
        return make

    out = tmp_path / "cut"
    # call 4: TPE's first trial on (a) (the enqueued common start), after 3 hypergradients; after
    # the resume, call 8: the 2nd step of the gradient run on (b), after 3 TPE and 3 CMA-ES trials
    for k, resume in ((4, False), (8, True)):
        calls["n"] = 0
        monkeypatch.setattr(job, "make_problem", interrupt_at(k))
        with pytest.raises(KeyboardInterrupt):
            job.run(cfg, out, resume=resume, show=False)
    monkeypatch.setattr(job, "make_problem", real)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(saved["runs"]["enet/seed0/gradient"]["trace"]) == 1  # cut where meant, mid-run
    resumed = job.run(cfg, out, resume=True, show=False)
    a, b = _finals(full), _finals(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
