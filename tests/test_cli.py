"""The `bilevel` command: help lists the jobs, --version, one-line user errors with status 2."""

import re

import pytest

import bilevel
from bilevel import cli

RST = re.compile(r"``|:(func|class|mod|meth|attr):`")
INTERNAL = re.compile(r"\bissue \d+|\btarget (is )?missed|\bto be filled|\bsession\b|\bhelper\b|\bTODO\b", re.I)


def _main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_lists_every_job_with_its_summary(capsys, flag):
    code, out, err = _main(capsys, flag)
    assert code == 0 and not err
    for name, job in cli.JOBS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(job.summary)}$", out, flags=re.M), name
    assert not RST.search(out) and not INTERNAL.search(out)


def test_run_help_exits_0_and_lists_the_jobs(capsys):
    code, out, _ = _main(capsys, "run", "--help")
    assert code == 0 and all(name in out for name in cli.JOBS)


def test_list_prints_one_job_per_line(capsys):
    code, out, _ = _main(capsys, "list")
    assert code == 0 and out.split() == sorted(cli.JOBS)


def test_version_is_the_package_version(capsys):
    code, out, _ = _main(capsys, "--version")
    assert code == 0 and out.strip() == f"bilevel {bilevel.__version__}"


@pytest.mark.parametrize("argv", [["frobnicate"], ["run", "no-such-job"], ["--bogus"]])
def test_unknown_command_or_job_is_one_line_and_status_2(capsys, argv):
    code, out, err = _main(capsys, *argv)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_extra_is_one_line_naming_it_before_any_work(capsys, monkeypatch):
    # a job module that does not exist: importing it (any work) would raise
    fake = cli.Job("bilevel.apps.no_such_module", "a job", needs=("no_such_dependency_xyz", "torch"))
    monkeypatch.setitem(cli.JOBS, "fake-job", fake)
    code, out, err = _main(capsys, "run", "fake-job", "--quick")
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no_such_dependency_xyz" in lines[0] and "bilevel[apps]" in lines[0]
    assert "torch" not in lines[0].split("needs", 1)[1].split("not installed")[0]  # only what is missing


def test_bad_flag_is_one_line_and_status_2(capsys):
    code, out, err = _main(capsys, "run", "ho-digits", "--bogus")
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "--bogus" in err and "Traceback" not in err


def test_bad_value_is_one_line_and_status_2(capsys):
    code, _, err = _main(capsys, "demo", "--seed", "abc")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(cli.JOBS))
def test_job_help_exits_0_without_rest_markup(capsys, name):
    if cli.missing(cli.JOBS[name]):
        pytest.skip(f"{name} needs {cli.missing(cli.JOBS[name])}")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", name, "--help"])
    out, _ = capsys.readouterr()
    assert exit_.value.code == 0
    assert out.startswith("usage: bilevel ") and "--out" in out and "--resume" in out
    assert not RST.search(out), f"reST markup in `bilevel run {name} --help`: {RST.search(out).group(0)}"
    assert not INTERNAL.search(out), f"internal words in `bilevel run {name} --help`: {INTERNAL.search(out).group(0)}"
