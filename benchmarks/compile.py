"""What torch.compile buys an AID hypergradient step: eager bilevel vs a compiled solver loop.

Per-feature-L2 logistic regression (as ``logreg.py``): ``g(w, λ) = mean softplus(−y Xw) +
½ Σ e^{λ_j} w_j²``, ``f`` the same loss on a validation half; the hypergradient at the ``w``
of 200 gradient steps by exactly K CG iterations (tol = 0), float64.  Side by side:

* ``bilevel eager``: :func:`bilevel.hypergrad` (``CG(maxiter=K, tol=0)``), with its checks;
* ``torch.func eager``: the same step written out in torch.func (one ``vjp`` of ``∇_w g``
  for the Hessian–vector products and the λ-part, K CG iterations), no checks;
* ``torch.func compiled``: that function under ``torch.compile(fullgraph=True)`` — the whole
  solve one graph, no break: the most an internally compiled solver loop could give;
* ``bilevel compiled_hypergrad``: :func:`bilevel.compiled_hypergrad` — that compiled solve
  inside the library, with the trust policy's checks after the graph;
* ``bilevel under compile``: ``torch.compile`` of a function that calls ``hypergrad`` (its
  entry point is a graph break by design: it runs eagerly, correctly);
* ``analytic``: the floor, K hand-coded Hessian–vector products ``Xᵀ(D X v) + e^λ v`` and two
  gradients, no autograd.

Reported: compile time (first call), steady-state median time per step, and the ratios to
``bilevel eager`` and to the floor.  CPU only here (inductor needs a C++ compiler); on a GPU
(``--device cuda``) the launch overhead that compilation removes is a larger share.

    python benchmarks/compile.py                      # 2000×200, K = 30
    python benchmarks/compile.py --sizes 2000x200,10000x1000 --out r.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.func import grad, vjp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import configure_threads, format_table, machine_info, write_json  # noqa: E402

import bilevel  # noqa: E402


def problem(n: int, d: int, device: str, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=torch.float64, generator=gen)
    y = torch.randn(n, generator=gen, dtype=torch.float64).sign()
    Xv = torch.randn(n // 2, d, dtype=torch.float64, generator=gen)
    yv = torch.randn(n // 2, generator=gen, dtype=torch.float64).sign()
    X, y, Xv, yv = (t.to(device) for t in (X, y, Xv, yv))
    lam = torch.full((d,), -2.0, dtype=torch.float64, device=device)

    def inner_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()

    w = torch.zeros(d, dtype=torch.float64, device=device)
    for _ in range(200):
        w = w - 0.5 * grad(inner_loss)(w, lam)
    return {"X": X, "y": y, "Xv": Xv, "yv": yv, "lam": lam, "w": w, "inner_loss": inner_loss,
            "outer_loss": outer_loss}


def func_step(p: dict[str, Any], K: int):
    inner_loss, outer_loss = p["inner_loss"], p["outer_loss"]

    def step(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        gw, gl = grad(outer_loss, argnums=(0, 1))(w, lam)
        _, pull = vjp(lambda ww, ll: grad(inner_loss)(ww, ll), w, lam)
        x, r = torch.zeros_like(gw), gw
        q, rr = r, r @ r
        for _ in range(K):
            Aq = pull(q)[0]
            a = rr / (q @ Aq)
            x, r = x + a * q, r - a * Aq
            rr_new = r @ r
            q, rr = r + (rr_new / rr) * q, rr_new
        return gl - pull(x)[1]

    return step


def analytic_step(p: dict[str, Any], K: int):
    X, y, Xv, yv, n = p["X"], p["y"], p["Xv"], p["yv"], p["X"].shape[0]

    def step(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(y * (X @ w))
        D = s * (1 - s) / n
        b = -(Xv.T @ (yv * torch.sigmoid(-yv * (Xv @ w)))) / Xv.shape[0]
        x, r = torch.zeros_like(w), b
        q, rr = r, r @ r
        for _ in range(K):
            Aq = X.T @ (D * (X @ q)) + lam.exp() * q
            a = rr / (q @ Aq)
            x, r = x + a * q, r - a * Aq
            rr_new = r @ r
            q, rr = r + (rr_new / rr) * q, rr_new
        return -lam.exp() * w * x

    return step


def timed(fn, repeats: int, device: str) -> tuple[float, float, torch.Tensor]:
    """(first-call seconds, median steady-state ms, result)."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return first, 1e3 * statistics.median(times), out


def measure(n: int, d: int, K: int, repeats: int, device: str) -> dict[str, tuple[float, float, torch.Tensor]]:
    """Every method on one problem: (first-call seconds, median ms, hypergradient)."""
    p = problem(n, d, device)
    w, lam = p["w"], p["lam"]
    solver = bilevel.CG(maxiter=K, tol=0.0)

    def aid(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return bilevel.hypergrad(p["outer_loss"], w, lam, inner_loss=p["inner_loss"], solver=solver)

    hand, floor = func_step(p, K), analytic_step(p, K)
    compiled_hand, compiled_aid = torch.compile(hand, fullgraph=True), torch.compile(aid)
    compiled_bilevel = bilevel.compiled_hypergrad(p["outer_loss"], inner_loss=p["inner_loss"], maxiter=K, tol=1.0)

    def bilevel_compiled(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return compiled_bilevel(w, lam)[0]

    methods = {"bilevel eager": aid, "bilevel compiled_hypergrad": bilevel_compiled,
               "torch.func eager": hand, "torch.func compiled": compiled_hand,
               "bilevel under compile": compiled_aid, "analytic": floor}
    return {name: timed(lambda fn=fn: fn(w, lam), repeats, device) for name, fn in methods.items()}


def deq_problem(n: int, d: int, device: str, seed: int = 0) -> dict[str, Any]:
    """A DEQ layer on a batch: hidden states w (n×d), Φ(w, λ) = tanh(w Wᵀ + X Uᵀ + b) with
    ‖W‖₂ = 0.7 (a contraction), λ = (U, b); f = ½‖w Cᵀ − Y‖²/n."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"dtype": torch.float64, "generator": gen}
    W = torch.randn(d, d, **kw)
    W = 0.7 * W / torch.linalg.matrix_norm(W, ord=2)
    X, C, Y = torch.randn(n, d, **kw), torch.randn(10, d, **kw) / d**0.5, torch.randn(n, 10, **kw)
    lam = (torch.randn(d, d, **kw) / d**0.5, 0.1 * torch.randn(d, **kw))
    W, X, C, Y = (t.to(device) for t in (W, X, C, Y))
    lam = tuple(t.to(device) for t in lam)

    def fixed_point(w: torch.Tensor, lam: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.tanh(w @ W.T + X @ lam[0].T + lam[1])

    def outer_loss(w: torch.Tensor, lam: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((w @ C.T - Y) ** 2).sum() / n

    w = torch.zeros(n, d, dtype=torch.float64, device=device)
    for _ in range(120):
        w = fixed_point(w, lam)
    return {"W": W, "X": X, "C": C, "Y": Y, "lam": lam, "w": w, "fixed_point": fixed_point,
            "outer_loss": outer_loss}


def deq_analytic_step(p: dict[str, Any], K: int):
    """The floor for the fixed-point form: D = 1 − w² (tanh' at the fixed point), K iterations
    v ← (D ⊙ v) W + ∇_w f, then (∂_λΦ)ᵀ v = ((D ⊙ v)ᵀ X, Σ D ⊙ v)."""
    W, X, C, Y = p["W"], p["X"], p["C"], p["Y"]

    def step(w: torch.Tensor, lam: Any) -> tuple[torch.Tensor, torch.Tensor]:
        D = 1 - w * w
        b = (w @ C.T - Y) @ C / w.shape[0]
        v = b
        for _ in range(K - 1):
            v = (D * v) @ W + b
        u = D * v
        return u.T @ X, u.sum(0)

    return step


def measure_deq(n: int, d: int, K: int, repeats: int, device: str) -> dict[str, tuple[float, float, torch.Tensor]]:
    """The fixed-point form: eager hypergrad (FixedPoint), compiled_hypergrad, the floor."""
    p = deq_problem(n, d, device)
    w, lam = p["w"], p["lam"]
    solver = bilevel.FixedPoint(maxiter=K, tol=0.0)
    compiled = bilevel.compiled_hypergrad(p["outer_loss"], fixed_point=p["fixed_point"], maxiter=K, tol=1.0)

    def flat(g: Any) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in g])

    methods = {
        "bilevel eager": lambda: flat(bilevel.hypergrad(p["outer_loss"], w, lam, fixed_point=p["fixed_point"],
                                                        solver=solver)),
        "bilevel compiled_hypergrad": lambda: flat(compiled(w, lam)[0]),
        "analytic": lambda: flat(deq_analytic_step(p, K)(w, lam)),
    }
    return {name: timed(fn, repeats, device) for name, fn in methods.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000x200", help="n x d, comma-separated (default 2000x200)")
    parser.add_argument("--deq", default="256x64,2048x256",
                        help="n x d of the DEQ layer (fixed-point form), comma-separated; '' for none")
    parser.add_argument("--K", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "compile.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("compile.py: --device cuda, but torch sees no CUDA device here; nothing measured.")
        return 0
    threads = configure_threads(args.threads)
    warnings.simplefilter("ignore", bilevel.ConvergenceWarning)  # tol = 0: exactly K iterations, by design
    rows, records = [], []
    runs = [("logistic", size, measure) for size in args.sizes.split(",") if size]
    runs += [("DEQ", size, measure_deq) for size in args.deq.split(",") if size]
    for problem_name, size, run in runs:
        n, d = (int(x) for x in size.lower().split("x"))
        res = run(n, d, args.K, args.repeats, args.device)
        ref_out = res["bilevel eager"][2]
        base, floor = res["bilevel eager"][1], res["analytic"][1]
        for name, (first, ms, out) in res.items():
            diff = float((out - ref_out).norm() / ref_out.norm())
            rows.append([f"{problem_name} {n}x{d}", name, f"{first:.2f}", f"{ms:.2f}", f"{ms / base:.2f}",
                         f"{ms / floor:.2f}", f"{diff:.1e}"])
            records.append({"problem": problem_name, "size": [n, d], "method": name, "first_call_s": first,
                            "median_ms": ms, "vs_bilevel_eager": ms / base, "vs_analytic": ms / floor,
                            "rel_diff": diff})
    print(format_table(["problem", "method", "first call s", "ms/step", "vs bilevel", "vs analytic", "rel. diff"],
                       rows))
    path = write_json(args.out, {"benchmark": "compile", "machine": machine_info(threads), "K": args.K,
                                 "device": args.device, "records": records})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
