"""The ``bilevel`` command.

    bilevel demo [options]        the main job: per-feature L2 HO on digits (= run ho-digits)
    bilevel run JOB [options]     one of the jobs below; ``bilevel run JOB --help`` for its options
    bilevel list                  the jobs

A mistake in the call (an ``--out`` that cannot be written, ``--resume`` with no or an
unreadable checkpoint, other settings than the checkpoint's) is one line on stderr and
exit status 2; Ctrl-C is one line (how to resume) and status 130.
"""

from __future__ import annotations

import importlib
import sys

# job name -> module in bilevel.apps with ``main(argv: list[str]) -> int``
JOBS: dict[str, str] = {
    "ho-digits": "bilevel.apps.ho_digits",
    "deq-digits": "bilevel.apps.deq_digits",
    "sample-complexity": "bilevel.apps.sample_complexity",
    "elastic-net": "bilevel.apps.elastic_net",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        return _run("ho-digits", rest, "bilevel demo")
    if cmd == "list":
        print("\n".join(sorted(JOBS)))
        return 0
    if cmd == "run":
        if not rest or rest[0] not in JOBS:
            print(f"bilevel run: name a job, one of: {', '.join(sorted(JOBS))}", file=sys.stderr)
            return 2
        return _run(rest[0], rest[1:], f"bilevel run {rest[0]}")
    print(f"bilevel: unknown command {cmd!r}; try `bilevel --help`.", file=sys.stderr)
    return 2


def _run(job: str, argv: list[str], prog: str) -> int:
    from bilevel.apps import _runs

    module = importlib.import_module(JOBS[job])
    return _runs.run_job(prog, module.main, argv, module._parser)


if __name__ == "__main__":
    sys.exit(main())
