"""The package as users install it: a wheel built from the repository, installed into a
clean virtual environment outside it, audits a pair with the thresholds it ships.

The dependencies are this environment's (a `.pth` file in the clean environment names
this one's site-packages, whose own `.pth` files, the editable crossaudit among them, are
not read from there), so the test checks the wheel itself (its modules, the shipped
thresholds, the report template and schema) without downloading anything."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "crossaudit", "components", "pipelines")
# What a local audit must not import: the extras it does not need (`pyproject.toml`).
EXTRAS_MODULES = ("mlflow", "kfp", "uvicorn", "starlette", "sklearn", "scipy")


def run(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_the_installed_wheel_audits_a_pair_with_its_shipped_thresholds(digits_zoo, tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ beside the sources
    source.mkdir()
    for part in SOURCES:
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / part, source / part)
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path, source, cwd=tmp_path
    )
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("crossaudit-*.whl"))
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    site = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    )
    installed = run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path
    )
    assert installed.returncode == 0, installed.stderr
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = run(python, "-c", "import crossaudit; print(crossaudit.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    version = run(venv / "bin" / "crossaudit", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("crossaudit "), version.stderr
    # The development harness stays in the repository, and its commands say so.
    harness = run(venv / "bin" / "crossaudit", "zoo", "data", "--out", tmp_path / "x.parquet", cwd=tmp_path)
    assert harness.returncode == 2 and "source checkout" in harness.stderr, harness.stderr

    audit = [
        "audit", digits_zoo.clean_cnn, digits_zoo.badnets_cnn, "--data", digits_zoo.audit_data,
        "--profile", "digits", "--json", "--out", tmp_path / "out",
    ]  # fmt: skip
    probe = (
        "import atexit, sys\n"
        f"extras = [m for m in {EXTRAS_MODULES!r}]\n"
        "atexit.register(lambda: print('imported:', [m for m in extras if m in sys.modules], file=sys.stderr))\n"
        "from crossaudit.cli import app\n"
        "app(sys.argv[1:], prog_name='crossaudit')\n"
    )
    done = run(python, "-c", probe, *audit, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["models"][1]["verdict"] == "backdoor" and report["models"][1]["threshold_profile"] == "digits"
    assert report["provenance"]["thresholds"] == "crossaudit/thresholds.json (shipped)"
    assert (tmp_path / "out" / "report.html").read_text().count("is backdoored") == 1
    assert "imported: []" in done.stderr.splitlines()[-1], done.stderr[-500:]
