"""Release packaging: the sdist and wheel build, pass `twine check`, carry the license and the
declared dependencies, and the wheel installed in a clean venv runs the README quickstart."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from doc_examples import examples, mismatch

import bilevel

ROOT = Path(__file__).parent.parent


def _sh(*cmd, cwd=None, env=None, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """sdist + wheel built from a copy of the sources (the build writes nothing into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    # no isolation: the build backend (setuptools) of the test environment, no network needed
    _sh(sys.executable, "-m", "build", "--sdist", "--wheel", "--no-isolation", "--outdir", out, src, cwd=src)
    wheel, sdist = next(out.glob("*.whl")), next(out.glob("*.tar.gz"))
    return wheel, sdist


def test_twine_check_passes(dist):
    out = _sh(sys.executable, "-m", "twine", "check", "--strict", *dist)
    assert out.count("PASSED") == 2


def test_wheel_metadata(dist):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    assert meta["Name"] == "bilevel" and meta["Version"] == bilevel.__version__
    assert meta["License-Expression"] == "MIT"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "bilevel/py.typed" in names
    core = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert core == ["torch>=2.13"], core  # numpy is used by the jobs only (apps extra)
    assert meta["Description-Content-Type"] == "text/markdown"


def test_sdist_has_license_and_readme(dist):
    import tarfile

    _, sdist = dist
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "src/bilevel/__init__.py"} <= names


def test_wheel_in_a_clean_venv_runs_the_quickstart(dist, tmp_path):
    wheel, _ = dist
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(_sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # torch is gigabytes and may not be downloadable here: the clean venv borrows the test
    # environment's site-packages through a .pth line, appended after its own site-packages,
    # so `bilevel` itself can only come from the wheel installed into the venv.
    (purelib / "_borrowed_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel)

    quickstart = next(e for e in examples(ROOT / "README.md") if e.expected is not None)
    (tmp_path / "quickstart.py").write_text(quickstart.code)
    # one process (torch imports slowly): where bilevel comes from, the console script's entry
    # point, then the quickstart as a script
    (tmp_path / "check.py").write_text(
        "import runpy, sys\n"
        "from importlib.metadata import entry_points\n"
        "import bilevel\n"
        "print(bilevel.__file__, file=sys.stderr)\n"
        "(script,) = entry_points(group='console_scripts', name='bilevel')\n"
        "sys.stdout = sys.stderr\n"
        "script.load()(['--version'])\n"
        "sys.stdout = sys.__stdout__\n"
        "runpy.run_path('quickstart.py', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([python, "check.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    where = next(line for line in lines if line.endswith("__init__.py"))
    version = next(line for line in lines if line.startswith("bilevel "))
    assert Path(where).is_relative_to(env_dir), f"bilevel imported from {where}, not from the wheel"
    assert version == f"bilevel {bilevel.__version__}"
    assert (env_dir / "bin" / "bilevel").is_file()
    assert mismatch(proc.stdout, quickstart.expected) is None, mismatch(proc.stdout, quickstart.expected)
