"""The built wheel carries the grammar and templates: an installed kvpolicy works anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jinja2
import lark
import markupsafe
import pytest

from conftest import POLICIES, ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(ROOT)], check=True, timeout=300)
    (built,) = out.glob("kvpolicy-*.whl")
    return built


def test_wheel_contains_grammar_and_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvpolicy/_data/grammar/kvp.lark" in names
    assert any(name.startswith("kvpolicy/_data/codegen/") for name in names)
    assert not any(name.startswith(("tests/", "policies/")) for name in names)


def test_installed_wheel_checks_and_plans_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-index", "--no-deps", str(wheel)],
                   check=True, timeout=300)
    # Tests run offline: lend the venv this environment's copies of kvpolicy's dependencies.
    lend = tmp_path / "lent"
    for package in (lark, jinja2, markupsafe):
        shutil.copytree(Path(package.__file__).parent, lend / package.__name__)
    work = tmp_path / "elsewhere"
    shutil.copytree(POLICIES, work / "policies")
    env = {"PYTHONPATH": str(lend), "PATH": str(bin_dir)}

    where = subprocess.run([str(bin_dir / "python"), "-c",
                            "import kvpolicy; print(kvpolicy.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout

    check = subprocess.run([str(bin_dir / "kvpolicy"), "check", "policies/aggressive.kvp",
                            "policies/evict_only.kvp"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    plan = subprocess.run([str(bin_dir / "kvpolicy"), "plan", "policies/kivi.kvp", "--model",
                           "smollm2-135m", "--context", "1000", "--json"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert '"compressed_bytes": 6865920' in plan.stdout
    compiled = subprocess.run([str(bin_dir / "kvpolicy"), "compile", "policies/kivi.kvp",
                               "--model", "smollm2-135m"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=60)
    assert compiled.returncode == 0, compiled.stderr  # the templates shipped in the wheel
    assert (work / "build" / "kivi" / "manifest.json").is_file()
