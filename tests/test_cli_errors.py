"""A user's mistakes reach them as one line on stderr (the problem and its fix), exit status 2,
no traceback, and before any compute; Ctrl-C is one line and status 130."""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle

import pytest
import torch

from bilevel import cli
from bilevel.apps import _runs

JOBS = sorted(cli.JOBS)
# what each job computes first: it must not be reached when the call is wrong
FIRST_COMPUTE = {
    "ho-digits": "load_data",
    "deq-digits": "load_data",
    "elastic-net": "load_data",
    "sample-complexity": "make_problem",
    "hyperclean": "load_data",
    "poison": "load_data",
    "biased-reg": "load_data",
    "meta-glar": "load_data",
    "hyperrep": "load_data",
    "imaml": "check_tasks",
    "lr-schedule": "load_data",
    "vs-optuna": "make_problem",
    "iteration-complexity": "make_problem",
}


def _module(job):
    return importlib.import_module(cli.JOBS[job].module)


@pytest.fixture
def no_compute(monkeypatch):
    """Every job fails loudly (a traceback, not a one-line message) if its compute starts."""

    def compute(*args, **kwargs):
        raise AssertionError("compute started")

    for job, name in FIRST_COMPUTE.items():
        monkeypatch.setattr(_module(job), name, compute)


def _bilevel(job, *args):
    return cli.main(["run", job, "--quick", "--no-progress", *map(str, args)])


def _one_line(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _valid_state(job, **config):
    """A checkpoint of ``job``'s --quick config (changed by ``config``) with every key it needs."""
    mod = _module(job)
    cfg = dataclasses.replace(mod.Config(**{**mod.QUICK, "seed": 0}), **config)
    state = {"config": dataclasses.asdict(cfg)}
    for key in getattr(mod, "CHECKPOINT_KEYS", ()):
        state[key] = 0
    if job == "sample-complexity":
        state["runs"] = {}
    return state


# ----------------------------------------------------------------------------- 1. unreadable checkpoint


def _truncated(path):
    torch.save(_valid_state("ho-digits"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPT = {
    "truncated": _truncated,
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(200)),
    "text": lambda p: p.write_text("hello, not a checkpoint\n"),
    "a list": lambda p: torch.save([1, 2, 3], p),
    "a plain pickle of a str": lambda p: p.write_bytes(pickle.dumps("state")),
    "a dict without config": lambda p: torch.save({"step": 1}, p),
    "a dict missing keys": lambda p: torch.save({"config": _valid_state("ho-digits")["config"]}, p),
    "config not a dict": lambda p: torch.save({**_valid_state("ho-digits"), "config": [1]}, p),
}


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize("kind", CORRUPT)
def test_unreadable_checkpoint_is_one_line(tmp_path, capsys, kind):
    ckpt = tmp_path / "checkpoint.pt"
    CORRUPT[kind](ckpt)
    before = ckpt.read_bytes()
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path), "--resume"]) == 2
    line = _one_line(capsys, "bilevel demo:", f"checkpoint {ckpt} is unreadable", "delete it or run without --resume")
    assert len(line) < 300
    assert ckpt.read_bytes() == before  # left as it was


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize("job", JOBS)
def test_every_job_refuses_an_empty_checkpoint(tmp_path, capsys, job):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert _bilevel(job, "--out", tmp_path, "--resume") == 2
    _one_line(capsys, f"bilevel run {job}:", "is unreadable", "run without --resume")


def test_load_checkpoint_raises_user_error(tmp_path):
    path = tmp_path / "c.pt"
    assert _runs.load_checkpoint(path) is None  # no file: nothing to load
    path.write_bytes(b"\x00junk")
    with pytest.raises(_runs.UserError, match="unreadable"):
        _runs.load_checkpoint(path)
    torch.save({"config": {}, "step": 3}, path)
    assert _runs.load_checkpoint(path, ("step",))["step"] == 3


# ----------------------------------------------------------------------------- 2. a bad --out


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("resume", [False, True])
def test_out_that_is_a_file(tmp_path, capsys, job, resume):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert _bilevel(job, "--out", afile, *(["--resume"] if resume else [])) == 2
    _one_line(capsys, f"--out {afile} is an existing file, not a folder", "pass a folder to --out")
    assert afile.read_text() == "keep me"


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize("job", JOBS)
def test_out_under_a_file_is_not_writable(tmp_path, capsys, job):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "out"
    assert _bilevel(job, "--out", out) == 2
    _one_line(capsys, f"--out {out} is not a writable folder", "pass another --out")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
@pytest.mark.usefixtures("no_compute")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _bilevel("ho-digits", "--out", ro) == 2
        _one_line(capsys, "is not a writable folder")
        assert _bilevel("ho-digits", "--out", ro / "sub") == 2
        _one_line(capsys, "is not a writable folder")
    finally:
        ro.chmod(0o755)


def test_prepare_out_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a" / "b"
    assert _runs.prepare_out(out, resume=False) == out
    assert out.is_dir() and list(out.iterdir()) == []  # the test write is removed


# ----------------------------------------------------------------------------- 3. nothing to resume


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize("job", JOBS)
def test_resume_with_no_checkpoint(tmp_path, capsys, job):
    assert _bilevel(job, "--out", tmp_path, "--resume") == 2
    _one_line(capsys, f"nothing to resume in {tmp_path}: no checkpoint.pt", "run without --resume to start")
    missing = tmp_path / "never-made"
    assert _bilevel(job, "--out", missing, "--resume") == 2
    _one_line(capsys, f"nothing to resume in {missing}")
    assert not missing.exists()  # the failed call created nothing


# ----------------------------------------------------------------------------- 4. Ctrl-C


@pytest.mark.parametrize("job", JOBS)
def test_ctrl_c_before_a_checkpoint(tmp_path, capsys, monkeypatch, job):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_module(job), "run", interrupted)
    assert _bilevel(job, "--out", tmp_path) == 130
    _one_line(capsys, f"bilevel run {job}: interrupted", "rerun the same command")


@pytest.mark.parametrize("job", JOBS)
def test_ctrl_c_after_a_checkpoint_says_resume(tmp_path, capsys, monkeypatch, job):
    def interrupted(cfg, out, **kwargs):
        _runs.save_checkpoint(out / "checkpoint.pt", _valid_state(job))
        raise KeyboardInterrupt

    monkeypatch.setattr(_module(job), "run", interrupted)
    assert _bilevel(job, "--out", tmp_path) == 130
    _one_line(capsys, "interrupted", str(tmp_path / "checkpoint.pt"), "rerun the same command with --resume")


def test_ctrl_c_in_a_real_run_keeps_a_valid_checkpoint(tmp_path, capsys, monkeypatch, one_thread):
    """ho-digits interrupted in its second outer step: exit 130, the step-1 checkpoint loads."""
    from bilevel.apps import ho_digits as H

    real, calls = H.job_hypergrad, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(H, "job_hypergrad", crashing)
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 130
    _one_line(capsys, "bilevel demo: interrupted", "--resume")
    assert _runs.load_checkpoint(tmp_path / "checkpoint.pt", H.CHECKPOINT_KEYS)["step"] == 1


# ----------------------------------------------------------------------------- 5. other settings


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize("job", JOBS)
def test_resume_with_other_settings(tmp_path, capsys, job):
    torch.save(_valid_state(job, seed=1), tmp_path / "checkpoint.pt")
    assert _bilevel(job, "--out", tmp_path, "--resume") == 2
    _one_line(capsys, "belongs to a run with other settings", "seed 1 there, 0 here", "run without --resume")


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize(("job", "option", "counter"), [("ho-digits", "steps", "step"),
                                                         ("deq-digits", "epochs", "epoch")])
def test_resume_past_the_asked_count(tmp_path, capsys, job, option, counter):
    state = _valid_state(job)
    state[counter] = 5
    torch.save(state, tmp_path / "checkpoint.pt")
    # more steps than the checkpoint's config: allowed, not "other settings"; fewer than done: refused
    assert _bilevel(job, "--out", tmp_path, "--resume", f"--{option}", 4) == 2
    _one_line(capsys, f"is at {counter} 5, past --{option} 4", f"resume with --{option} 5 or more")


def test_other_settings_is_still_a_value_error_for_the_job_main(tmp_path, no_compute):
    from bilevel.apps import sample_complexity as job

    torch.save(_valid_state("sample-complexity", seed=1), tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="other settings"):
        job.main(["--quick", "--out", str(tmp_path), "--no-progress", "--resume"])


@pytest.mark.usefixtures("no_compute")
def test_bad_count_is_one_line(tmp_path, capsys):
    assert _bilevel("ho-digits", "--out", tmp_path, "--steps", 0) == 2
    _one_line(capsys, "--steps should be >= 1, not 0", "pass --steps 1 or more")
