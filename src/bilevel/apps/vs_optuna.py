"""Gradient-based hyperparameter optimisation against Optuna's TPE and CMA-ES at equal wall clock.

Two problems, each method given the same budget per seed (wall-clock seconds, or with
``--budget-kind steps`` the same number of evaluations: trials for Optuna, outer steps for
the gradient method), several seeds (seed s draws the data split / noise features and the
samplers' seeds; every method sees the same instance for a given seed):

(a) the demo problem (:mod:`bilevel.apps.ho_digits`): multinomial logistic regression on
    digits + ``demo_noise`` pure-noise features, one L2 penalty ``e^{λ_j}`` per feature
    (about 190 hyperparameters), ``F(λ) = CE_val(w(λ))``.  Gradient: Adam on λ with the AID
    hypergradient (CG on ``H v = ∇_w F``), inner L-BFGS warm-started — the demo's own loop.
(b) a two-hyperparameter elastic net on scikit-learn's diabetes + ``enet_noise`` noise
    features (:mod:`bilevel.apps.elastic_net`)::

        w(θ) = argmin_w 1/(2n)‖Xw − y‖² + α1‖w‖₁ + (α2/2)‖w‖²,    θ = (log α1, log α2)

    (α = α1 + α2 and l1_ratio = α1/α of scikit-learn's parameterisation), ``F(θ) = MSE_val``.
    Gradient: Adam on θ with the hypergradient of the nonsmooth fixed point
    ``w = prox(w − η∇g(w))`` (:func:`bilevel.hypergrad`, ``fixed_point=``, GMRES; exact
    where the support is locally constant, Grazzi et al. ICML 2024), FISTA warm-started.

Every method searches the same box of log-hyperparameters and evaluates the same starting
point first (the gradient method's start; CMA-ES then samples around the box's centre).  Optuna trials solve the
inner problem from zero (trials are independent); each study lives in a JournalStorage file
in the run folder and the trial's sampler is seeded by (seed, completed trials), so an
interrupted study resumed with ``--resume`` asks the same points.  The clock of a method
covers all its work: sampler, storage, inner solves, hypergradients, checkpoints.

Wall-clock budgets are not reproducible bit for bit (how many steps fit in a second depends
on the machine and its load); ``--budget-kind steps`` is, and the tests use it.

    bilevel run vs-optuna [--out runs/vs-optuna] [--seeds N] [--budget-kind time|steps]
                          [--seconds-demo S] [--seconds-enet S] [--seed S] [--resume] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bilevel
from bilevel.apps import _runs
from bilevel.apps import elastic_net as EN
from bilevel.apps import ho_digits as HO

METHODS = ("gradient", "tpe", "cmaes")
PROBLEMS = ("demo", "enet")
JOURNAL = "optuna.journal"


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    seeds: int = 3
    seed: int = 0  # seed s of the run uses seed + s
    budget_kind: str = "time"  # "time": seconds per (problem, method, seed); "steps": evaluations
    seconds_demo: float = 15.0
    seconds_enet: float = 8.0
    steps_demo: int = 30  # with budget_kind "steps": trials / outer steps per (method, seed)
    steps_enet: int = 60
    methods: tuple[str, ...] = METHODS
    demo_noise: int = 128
    demo_train: int = 300
    demo_val: int = 600
    demo_inner_maxiter: int = 500
    demo_inner_tol: float = 1e-7  # L-BFGS: max |∇_w g| (the demo's setting)
    demo_lr: float = 0.1  # Adam on λ (natural log)
    enet_noise: int = 40
    enet_lr: float = 0.1  # Adam on θ = log α
    curve_points: int = 60


QUICK = {"seeds": 2, "budget_kind": "steps", "steps_demo": 3, "steps_enet": 4, "demo_noise": 8, "demo_train": 120,
         "demo_val": 120, "demo_inner_maxiter": 200, "enet_noise": 10, "curve_points": 10}

CHECKPOINT_KEYS = ("step", "runs")


# ----------------------------------------------------------------------------- the two problems


@dataclass
class Problem:
    """One problem instance: the box of its log-hyperparameters, the start, a cold-start
    validation loss (Optuna's objective), a gradient method, and the test evaluation."""

    name: str
    n_hparams: int
    low: float  # the box, per coordinate (natural-log scale)
    high: float
    start: torch.Tensor
    val_loss: Callable[[torch.Tensor], float]
    grad_init: Callable[[], dict[str, Any]]
    # (F(hp), ∇F(hp)) at st["hp"]; keeps the warm starts (inner solution, linear-system solution) in st
    hypergrad: Callable[[dict[str, Any]], tuple[float, torch.Tensor]]
    lr: float  # Adam's step on the log-hyperparameters
    test: Callable[[torch.Tensor], dict[str, float]]


def _on(data: Any, device: torch.device | str) -> Any:
    """A frozen data dataclass with its tensors moved to ``device``."""
    return dataclasses.replace(data, **{f.name: getattr(data, f.name).to(device) for f in dataclasses.fields(data)
                                        if isinstance(getattr(data, f.name), torch.Tensor)})


def demo_problem(cfg: Config, seed: int, device: torch.device | str = "cpu") -> Problem:
    """(a): per-feature L2 on digits + noise (:mod:`bilevel.apps.ho_digits`)."""
    hcfg = HO.Config(seed=seed, n_noise=cfg.demo_noise, n_train=cfg.demo_train, n_val=cfg.demo_val,
                     inner_maxiter=cfg.demo_inner_maxiter, inner_tol=cfg.demo_inner_tol, lr=cfg.demo_lr)
    data = _on(HO.load_data(hcfg), device)
    zeros = lambda: tuple(p.to(device) for p in HO.init_params(data))  # noqa: E731
    inner_loss, _ = HO.make_losses(data)
    opts = HO.inner_options(hcfg)
    d = data.X_train.shape[1]
    low, high = hcfg.box[0] * HO.LN10, hcfg.box[1] * HO.LN10

    def fit(lam: torch.Tensor) -> HO.Params:
        return HO.solve_inner(inner_loss, zeros(), lam.to(device, HO.DTYPE), **opts)[0]

    def grad_init() -> dict[str, Any]:
        lam = torch.full((d,), hcfg.lam0, dtype=HO.DTYPE, device=device)
        return {"hp": lam, "params": zeros(), "v": None, "adam": None}

    def hypergrad(st: dict[str, Any]) -> tuple[float, torch.Tensor]:
        params, _ = HO.solve_inner(inner_loss, st["params"], st["hp"], **opts)
        hg, info = HO.job_hypergrad(data, params, st["hp"], hcfg, init=st["v"])
        st.update(params=params, v=info.v)
        return float(info.outer_loss), hg

    def test(lam: torch.Tensor) -> dict[str, float]:
        return HO.evaluate(data, fit(lam))

    return Problem("demo", d, low, high, torch.full((d,), hcfg.lam0, dtype=HO.DTYPE, device=device),
                   lambda lam: HO.evaluate(data, fit(lam))["val_loss"], grad_init, hypergrad, hcfg.lr, test)


def enet_problem(cfg: Config, seed: int, device: torch.device | str = "cpu") -> Problem:
    """(b): elastic net with θ = (log α1, log α2) on diabetes + noise (:mod:`bilevel.apps.elastic_net`)."""
    ecfg = EN.Config(seed=seed, n_noise=cfg.enet_noise, lr=cfg.enet_lr)
    data = _on(EN.load_data(ecfg), device)
    d = data.X_train.shape[1]
    phi = EN.make_map(data.X_train, data.y_train, torch.zeros(d, dtype=torch.long, device=device))
    low, high = math.log(ecfg.box[0]), math.log(ecfg.box[1])
    start = torch.full((2,), math.log(ecfg.alpha0), dtype=EN.DTYPE, device=device)

    def outer_loss(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((data.X_val @ w - data.y_val) ** 2).mean()

    def fit(theta: torch.Tensor, w0: torch.Tensor | None = None) -> torch.Tensor:
        w0 = torch.zeros(d, dtype=EN.DTYPE, device=device) if w0 is None else w0
        return EN.solve_inner(phi, w0, theta.to(device, EN.DTYPE), ecfg)

    def grad_init() -> dict[str, Any]:
        return {"hp": start.clone(), "params": torch.zeros(d, dtype=EN.DTYPE, device=device), "v": None,
                "adam": None}

    def hypergrad(st: dict[str, Any]) -> tuple[float, torch.Tensor]:
        # F = ½ MSE_val: the hypergradient of the MSE is twice this one
        w = fit(st["hp"], st["params"])
        hg, info = bilevel.hypergrad(outer_loss, w, st["hp"], fixed_point=phi,
                                     solver=bilevel.GMRES(tol=ecfg.gmres_tol, maxiter=500), init=st["v"],
                                     return_info=True)
        st.update(params=w, v=info.v)
        return EN.mse(w, data.X_val, data.y_val), 2 * hg

    def test(theta: torch.Tensor) -> dict[str, float]:
        w = fit(theta)
        return {"val_mse": EN.mse(w, data.X_val, data.y_val), "test_mse": EN.mse(w, data.X_test, data.y_test),
                "nonzeros": int((w != 0).sum())}

    return Problem("enet", 2, low, high, start, lambda th: EN.mse(fit(th), data.X_val, data.y_val),
                   grad_init, hypergrad, ecfg.lr, test)


def _adam(st: dict[str, Any], hg: torch.Tensor, lr: float, low: float, high: float) -> None:
    """One projected Adam step on ``st["hp"]`` (a copy: the job's own tensor); the optimiser state lives in ``st``."""
    hp = st["hp"].clone().requires_grad_(True)
    opt = torch.optim.Adam([hp], lr=lr)
    if st["adam"] is not None:
        opt.load_state_dict(st["adam"])
    hp.grad = hg.detach()
    opt.step()
    with torch.no_grad():
        hp.clamp_(low, high)
    st.update(hp=hp.detach().clone(), adam=opt.state_dict())


PROBLEM_BUILDERS = {"demo": demo_problem, "enet": enet_problem}


def make_problem(cfg: Config, name: str, seed: int, device: torch.device | str = "cpu") -> Problem:
    return PROBLEM_BUILDERS[name](cfg, seed, device)


# ----------------------------------------------------------------------------- the methods


def budget(cfg: Config, problem: str) -> float:
    if cfg.budget_kind == "time":
        return cfg.seconds_demo if problem == "demo" else cfg.seconds_enet
    return cfg.steps_demo if problem == "demo" else cfg.steps_enet


def _spent(cfg: Config, elapsed: float, evals: int, limit: float) -> bool:
    return (elapsed if cfg.budget_kind == "time" else evals) >= limit


def run_gradient(cfg: Config, pb: Problem, limit: float, st: dict[str, Any] | None,
                 save: Callable[[dict[str, Any]], None], every: int) -> dict[str, Any]:
    """Outer steps until the budget is spent, best-so-far recorded; ``st`` resumes a run."""
    if st is None:
        st = {"opt": pb.grad_init(), "elapsed": 0.0, "trace": [], "best_val": math.inf, "best_hp": None}
    while not _spent(cfg, st["elapsed"], len(st["trace"]), limit):
        t0 = time.perf_counter()
        hp = st["opt"]["hp"].clone()
        val, hg = pb.hypergrad(st["opt"])
        _adam(st["opt"], hg, pb.lr, pb.low, pb.high)
        if val < st["best_val"]:
            st.update(best_val=val, best_hp=hp)
        st["trace"].append((st["elapsed"] + time.perf_counter() - t0, val))
        if len(st["trace"]) % every == 0:
            save(st)
        st["elapsed"] += time.perf_counter() - t0  # the checkpoint counts too
    save(st)
    return st


def _sampler(method: str, seed: int, done: int, pb: Problem) -> Any:
    import optuna

    s = (seed * 1_000_003 + done) % (2**31 - 1)  # fresh per trial: a resumed study asks the same points
    if method == "tpe":
        return optuna.samplers.TPESampler(seed=s)
    if method == "cmaes":
        # centred on the box (x0 is deprecated since Optuna 4.9); its first trial is the enqueued start
        return optuna.samplers.CmaEsSampler(seed=s, warn_independent_sampling=False)
    raise ValueError(f"method should be one of {METHODS}, not {method!r}")


def _as_params(hp: torch.Tensor) -> dict[str, float]:
    return {f"h{j:03d}": float(v) for j, v in enumerate(hp.tolist())}


def run_optuna(cfg: Config, pb: Problem, method: str, seed: int, limit: float, storage: Any, name: str
               ) -> dict[str, Any]:
    """Ask-and-tell until the budget is spent; the study in ``storage`` is the checkpoint:
    each trial stores the method's clock at its end, a trial left running by an interrupt
    is marked failed and asked again."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
    dists = {k: optuna.distributions.FloatDistribution(pb.low, pb.high) for k in _as_params(pb.start)}
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        # the same first point as the gradient method (again, if an interrupt took the first)
        study.enqueue_trial(_as_params(pb.start))
    elapsed = done[-1].user_attrs["elapsed"] if done else 0.0
    n = len(done)
    while not _spent(cfg, elapsed, n, limit):
        t0 = time.perf_counter()
        study.sampler = _sampler(method, seed, n, pb)
        trial = study.ask(dists)
        hp = torch.tensor([trial.params[k] for k in dists], dtype=torch.float64, device=pb.start.device)
        val = pb.val_loss(hp)
        # the clock at the end of the trial; its own tell is counted in the next trial's
        trial.set_user_attr("elapsed", elapsed + time.perf_counter() - t0)
        study.tell(trial, val)
        n += 1
        elapsed += time.perf_counter() - t0
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    trace = [(t.user_attrs["elapsed"], t.value) for t in done]
    best = min(done, key=lambda t: (t.value, t.number))
    return {"elapsed": trace[-1][0], "trace": trace, "best_val": best.value,
            "best_hp": torch.tensor([best.params[k] for k in dists], dtype=torch.float64, device=pb.start.device)}


# ----------------------------------------------------------------------------- the run


def run_keys(cfg: Config) -> list[tuple[str, int, str]]:
    return [(p, s, m) for p in PROBLEMS for s in range(cfg.seeds) for m in cfg.methods]


def _key(problem: str, s: int, method: str) -> str:
    return f"{problem}/seed{s}/{method}"


def check_config(cfg: Config) -> None:
    if cfg.budget_kind not in ("time", "steps"):
        raise _runs.UserError(f"--budget-kind should be time or steps, not {cfg.budget_kind!r}")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise _runs.UserError(f"--methods should be among {', '.join(METHODS)}, not {', '.join(bad) or 'none'}")
    if "cmaes" in cfg.methods:
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise _runs.UserError("CMA-ES needs the cmaes package: pip install cmaes, "
                                  "or leave it out with --methods gradient tpe")
    for name in ("seconds_demo", "seconds_enet"):
        if not getattr(cfg, name) > 0:
            raise _runs.UserError(f"--{name.replace('_', '-')} should be > 0, not {getattr(cfg, name)}")


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True, every: int = 1,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Every (problem, seed, method) run, then the test evaluation of each final choice;
    ``results.json`` and ``vs_optuna.png`` in ``out``."""
    check_config(cfg)
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    ckpt, journal = out / _runs.CHECKPOINT, out / JOURNAL
    if saved is None and journal.exists():
        journal.unlink()  # a fresh start: the old studies would be continued otherwise
    storage = JournalStorage(JournalFileBackend(str(journal)))
    t_start = time.perf_counter()
    state = {"config": dataclasses.asdict(cfg), "step": 0, "runs": {}} if saved is None else saved
    keys = run_keys(cfg)
    problems: dict[tuple[str, int], Problem] = {}

    def problem(name: str, s: int) -> Problem:
        if (name, s) not in problems:
            problems.clear()  # one instance alive at a time
            problems[(name, s)] = make_problem(cfg, name, cfg.seed + s, device)
        return problems[(name, s)]

    def save(st: dict[str, Any]) -> None:
        _runs.save_checkpoint(ckpt, st)

    for i in _runs.steps(len(keys), state, save, desc="runs (problem, seed, method)", show=show):
        name, s, method = keys[i]
        key = _key(name, s, method)
        pb, limit = problem(name, s), budget(cfg, name)
        if method == "gradient":

            def save_run(st: dict[str, Any], key: str = key) -> None:
                state["runs"][key] = st
                save(state)

            r = run_gradient(cfg, pb, limit, state["runs"].get(key), save_run, every)
        else:
            r = run_optuna(cfg, pb, method, cfg.seed + s, limit, storage, key)
        state["runs"][key] = {"elapsed": r["elapsed"], "trace": r["trace"], "best_val": r["best_val"],
                              "best_hp": r["best_hp"].cpu(), "test": pb.test(r["best_hp"])}
    results = summarise(cfg, state["runs"])
    results["config"] = dataclasses.asdict(cfg)
    results["optuna_storage"] = str(journal)
    results["total_seconds"] = time.perf_counter() - t_start
    results["threads"] = torch.get_num_threads()
    plot(results, out / "vs_optuna.png")
    _runs.write_json(out / "results.json", results)
    return results


def _curve(trace: list[tuple[float, float]], grid: list[float]) -> list[float]:
    """Best value so far at each time of ``grid`` (NaN before the first evaluation ended)."""
    out, best, j = [], math.inf, 0
    for t in grid:
        while j < len(trace) and trace[j][0] <= t:
            best = min(best, trace[j][1])
            j += 1
        out.append(best if math.isfinite(best) else math.nan)
    return out


def _band(grid: list[float], curves: list[list[float]]) -> dict[str, list[float]]:
    """Mean, min and max over seeds at each time (NaN until every seed has a value)."""
    cols = [c if not any(map(math.isnan, c)) else None for c in zip(*curves)]
    return {"time": grid, "mean": [statistics.fmean(c) if c else math.nan for c in cols],
            "min": [min(c) if c else math.nan for c in cols], "max": [max(c) if c else math.nan for c in cols]}


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(cfg: Config, runs: dict[str, Any]) -> dict[str, Any]:
    """Per problem and method: curves (mean, min, max over seeds of the best validation loss on
    a common time grid), the final choice's validation and test numbers, mean ± s.d."""
    res: dict[str, Any] = {"scales": {"best_hp": "log", "hp_names": "demo: log λ_j per feature; "
                                      "enet: (log α1, log α2)"},
                           "problems": {}}
    test_key = {"demo": "test_loss", "enet": "test_mse"}
    for name in PROBLEMS:
        per_method: dict[str, Any] = {}
        horizon = max(r["elapsed"] for k, r in runs.items() if k.startswith(name + "/"))
        grid = [horizon * (i + 1) / cfg.curve_points for i in range(cfg.curve_points)]
        for m in cfg.methods:
            rs = [runs[_key(name, s, m)] for s in range(cfg.seeds)]
            curves = [_curve(r["trace"], grid) for r in rs]
            # paired across methods: each run's best so far over F(start), its first evaluation
            rel = [[v / r["trace"][0][1] for v in c] for c, r in zip(curves, rs)]
            vals, tests = [r["best_val"] for r in rs], [r["test"][test_key[name]] for r in rs]
            per_method[m] = {
                "seeds": [{"best_val": r["best_val"], "evaluations": len(r["trace"]), "seconds": r["elapsed"],
                           "test": r["test"], "best_hp": r["best_hp"].tolist(),
                           "trace": [list(p) for p in r["trace"]]} for r in rs],
                "best_val_mean": _mean_sd(vals)[0], "best_val_sd": _mean_sd(vals)[1],
                "test_mean": _mean_sd(tests)[0], "test_sd": _mean_sd(tests)[1],
                "evaluations_mean": statistics.fmean(len(r["trace"]) for r in rs),
                "seconds_mean": statistics.fmean(r["elapsed"] for r in rs),
                "curve": _band(grid, curves),
                "curve_relative_to_start": _band(grid, rel),
            }
            if name == "demo":
                per_method[m]["test_acc_mean"] = statistics.fmean(r["test"]["test_acc"] for r in rs)
        res["problems"][name] = {"methods": per_method, "test_metric": test_key[name],
                                 "val_metric": "val_loss" if name == "demo" else "val_mse",
                                 "budget": budget(cfg, name), "budget_kind": cfg.budget_kind,
                                 "n_hparams": len(runs[_key(name, 0, cfg.methods[0])]["best_hp"])}
        res["problems"][name]["winner_val"] = min(per_method, key=lambda m: per_method[m]["best_val_mean"])
        res["problems"][name]["winner_test"] = min(per_method, key=lambda m: per_method[m]["test_mean"])
    return res


# ----------------------------------------------------------------------------- output

TITLES = {"demo": "(a) per-feature L2 on digits + noise", "enet": "(b) elastic net on diabetes (2 hparams)"}
LABELS = {"gradient": "gradient (hypergradient + Adam)", "tpe": "Optuna TPE", "cmaes": "Optuna CMA-ES"}


def table(res: dict[str, Any]) -> str:
    lines = []
    for name, pr in res["problems"].items():
        unit = "s" if pr["budget_kind"] == "time" else " evaluations"
        lines.append(f"{TITLES[name]}: {pr['n_hparams']} hyperparameters, budget {pr['budget']:g}{unit} per seed, "
                     f"{len(next(iter(pr['methods'].values()))['seeds'])} seeds (mean ± s.d.)")
        head = (f"  {'method':<32} {'evals':>6} {'seconds':>7}  {'best ' + pr['val_metric']:>17}  "
                f"{pr['test_metric']:>17}" + ("  test acc" if name == "demo" else ""))
        lines += [head, "  " + "-" * (len(head) - 2)]
        for m, r in pr["methods"].items():
            line = (f"  {LABELS[m]:<32} {r['evaluations_mean']:>6.1f} {r['seconds_mean']:>7.1f}  "
                    f"{r['best_val_mean']:>8.4f} ± {r['best_val_sd']:<6.4f}  "
                    f"{r['test_mean']:>8.4f} ± {r['test_sd']:<6.4f}")
            if name == "demo":
                line += f"  {r['test_acc_mean']:>8.3f}"
            lines.append(line)
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Best validation loss so far over its value at the common start, against time: the mean
    over seeds and the min–max band (dividing by F(start) pairs the methods on each seed)."""
    fig, axes = _runs.figure(ncols=2, size=(12, 4.2))
    for ax, (name, pr) in zip(axes, res["problems"].items()):
        for i, (m, r) in enumerate(pr["methods"].items()):
            c = r["curve_relative_to_start"]
            color = _runs.PALETTE[i]
            ax.plot(c["time"], c["mean"], color=color, label=LABELS[m])
            ax.fill_between(c["time"], c["min"], c["max"], color=color, alpha=0.2, linewidth=0)
        ax.set(xlabel="wall-clock seconds (per seed)" if pr["budget_kind"] == "time" else "seconds (per seed)",
               ylabel=f"best {pr['val_metric']} so far / at start", title=TITLES[name])
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run vs-optuna",
                         "Gradient hyperparameter optimisation vs Optuna TPE and CMA-ES at equal wall clock.",
                         "runs/vs-optuna", device=True, checkpoint_every=True)
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per method (default {Config.seeds})")
    p.add_argument("--budget-kind", choices=("time", "steps"), default=None,
                   help="time: the same seconds per method and seed (default); steps: the same number of "
                        "evaluations (reproducible)")
    p.add_argument("--seconds-demo", type=float, default=None,
                   help=f"seconds per method and seed on problem (a) (default {Config.seconds_demo})")
    p.add_argument("--seconds-enet", type=float, default=None,
                   help=f"seconds per method and seed on problem (b) (default {Config.seconds_enet})")
    p.add_argument("--steps-demo", type=int, default=None,
                   help=f"evaluations per method and seed on (a), --budget-kind steps (default {Config.steps_demo})")
    p.add_argument("--steps-enet", type=int, default=None,
                   help=f"evaluations per method and seed on (b), --budget-kind steps (default {Config.steps_enet})")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="methods to compare (default all)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    kw = _runs.config_kwargs(args, QUICK, {"seeds": 1, "steps_demo": 1, "steps_enet": 1})
    for name in ("budget_kind", "seconds_demo", "seconds_enet"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.methods is not None:
        kw["methods"] = tuple(dict.fromkeys(args.methods))
    return Config(**kw)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    device = _runs.resolve_device(args.device)
    out = Path(args.out)
    with _runs.one_thread():  # small problems: one thread is fastest, for every method alike
        res = run(cfg, out, resume=args.resume, show=not args.no_progress, every=args.checkpoint_every,
                  device=device)
    print(table(res))
    for name, pr in res["problems"].items():
        print(f"{name}: lowest validation loss: {LABELS[pr['winner_val']]}; lowest test loss: "
              f"{LABELS[pr['winner_test']]}")
    print(f"total {res['total_seconds']:.1f}s; wrote {out / 'results.json'} and {out / 'vs_optuna.png'}; "
          f"Optuna studies in {res['optuna_storage']}")
    return 0
