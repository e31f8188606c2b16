"""What an installed package promises: its Python floor, its declared dependencies, the files its CLI
needs (checked in a wheel installed outside the source tree), and settings read from one place."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SOURCES = sorted((REPO / "projlens_mi").rglob("*.py")) + sorted((REPO / "hooks").rglob("*.py"))
# stdlib modules newer than some Python 3 still in use: the floor must be at least their version
STDLIB_SINCE = {"tomllib": (3, 11)}


def _imports() -> dict[str, set[str]]:
    """Top-level names of every absolute import in the package's sources -> the files importing them."""
    out: dict[str, set[str]] = {}
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for n in names:
                out.setdefault(n.split(".")[0], set()).add(str(f.relative_to(REPO)))
    return out


def _declared() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    reqs += [Requirement(r) for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra]
    return {md_name(r.name): r for r in reqs}


def md_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_python_floor_is_true():
    floor = Version(SpecifierSet(PYPROJECT["project"]["requires-python"]).__iter__().__next__().version)
    imported = _imports()
    for mod, since in STDLIB_SINCE.items():
        if mod in imported:
            assert floor.release[:2] >= since, f"{mod} (Python {since}) imported by {sorted(imported[mod])}"
    # every installed dependency must itself install on the floor version
    for name, req in _declared().items():
        try:
            needs = md.metadata(name).get("Requires-Python")
        except md.PackageNotFoundError:
            continue
        if needs:
            assert SpecifierSet(needs).contains(f"{floor.major}.{floor.minor}.0"), \
                f"{name} {md.version(name)} requires Python {needs}, but the package promises {floor}"


def test_every_import_is_declared_and_every_dependency_imported():
    dists = md.packages_distributions()
    declared = _declared()
    used = set()
    for mod, files in _imports().items():
        if mod in sys.stdlib_module_names or mod == "projlens_mi":
            continue
        names = {md_name(d) for d in dists.get(mod, [])}
        assert names & set(declared), f"{mod} (imported by {sorted(files)}) is not declared in pyproject.toml"
        used |= names
    test_only = {md_name(r) for r in ("pytest",)}
    assert set(declared) - used - test_only == set(), "declared but never imported"


def test_version_is_written_once():
    import projlens_mi
    assert "version" in PYPROJECT["project"]["dynamic"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "projlens_mi.__version__"}
    assert md.version("projlens_mi") == projlens_mi.__version__


def test_settings_live_in_one_module():
    """PROJLENS_CACHE and the device-map strategies are read / defined only in projlens_mi/settings.py."""
    for f in SOURCES:
        if f.name == "settings.py":
            continue
        text = f.read_text()
        # the variable's name as a string (what an environment read needs) and the default folder
        assert not re.search(r"[\"']PROJLENS_CACHE[\"']", text) and '".cache"' not in text, f
        assert not re.search(r"^DEVICE_MAP_STRATEGIES\s*=", text, re.M), f


def test_cache_setting_is_read_when_asked(monkeypatch, tmp_path):
    from projlens_mi import settings
    from projlens_mi.study import steps
    monkeypatch.setenv("PROJLENS_CACHE", str(tmp_path / "c"))
    assert settings.default_organism() == tmp_path / "c" / "organism"
    steps._save_memo({"k": "v"})
    assert steps._load_memo() == {"k": "v"} and (tmp_path / "c" / steps.MEMO_NAME).is_file()
    monkeypatch.delenv("PROJLENS_CACHE")
    assert settings.cache_dir() == Path.home() / ".cache" / "projlens_mi"


def test_installed_wheel_runs_the_cli_outside_the_source_tree(tmp_path):
    """Build a wheel, install it into a bare folder (no deps: they come from this venv), and run
    `projlens --version` and `projlens demo --plan` from a folder that is not the checkout."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "benchmarks", "docs", "build",
                                                             "*.egg-info", "__pycache__", ".pytest_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("projlens_mi-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    shutil.rmtree(src)       # nothing of the source tree is left to find
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import projlens_mi, projlens_mi.cli as cli\n"
        "assert projlens_mi.__file__.startswith(sys.argv[1]), projlens_mi.__file__\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(cli.app, ['--version']); print(r.exit_code, r.output.strip())\n"
        "r = CliRunner().invoke(cli.app, ['demo', '--plan', '--organism', sys.argv[2], '--out', sys.argv[3]])\n"
        "print(r.exit_code, r.output.strip().splitlines()[-1])\n"
        "print(cli.shipped_study('quickstart.toml'))\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site"), str(tmp_path / "org"),
                          str(tmp_path / "demo")], cwd=work, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    version, plan, where = out.stdout.strip().splitlines()[-3:]
    import projlens_mi
    assert version == f"0 projlens {projlens_mi.__version__}"
    assert plan.startswith("0 ") and "steps to run" in plan, plan
    assert where == str(tmp_path / "site" / "projlens_mi" / "studies" / "quickstart.toml")
    assert not (tmp_path / "demo").exists()
