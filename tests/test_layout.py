"""The package's layout rules (issue 20): import-linter contracts, size limits, README links.

Each check reads the tree as it is; none asserts a wall-clock time.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"module": 500, "function": 60, "class": 250}  # lines, in pfc_sweeps/ and analysis/
README_MAX_LINES = 300


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [exe, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_hold():
    p = _lint_imports(REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", p.stdout)
    assert kept and int(kept.group(1)) >= 3, p.stdout


@pytest.mark.parametrize(
    "module, line",
    [
        ("pfc_sweeps/collapse/metrics.py", "import wandb\n"),
        ("pfc_sweeps/surrogate/solver.py", "from pfc_sweeps.jobs import dispatch\n"),
        ("pfc_sweeps/results/sink.py", "import pfc_sweeps.jobs.jobdir\n"),
        ("pfc_sweeps/nets/resnets.py", "import analysis.aggregate\n"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line):
    for part in ("pfc_sweeps", "analysis"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + "\n" + line)
    p = _lint_imports(tmp_path)
    assert p.returncode != 0 and "BROKEN" in p.stdout, p.stdout + p.stderr


def _units(path: Path):
    """(kind, name, lines) of every function and class in ``path``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            yield kind, node.name, node.end_lineno - node.lineno + 1


def test_modules_functions_and_classes_within_their_size_limits():
    over = []
    for path in sorted([*REPO.glob("pfc_sweeps/**/*.py"), *REPO.glob("analysis/**/*.py")]):
        rel = path.relative_to(REPO)
        n = len(path.read_text().splitlines())
        if n > LIMITS["module"]:
            over.append(f"{rel}: {n} lines")
        over += [
            f"{rel}: {kind} {name} {lines} lines"
            for kind, name, lines in _units(path)
            if lines > LIMITS[kind]
        ]
    assert not over, "over the size limits " + str(LIMITS) + ":\n" + "\n".join(over)


def test_size_check_is_able_to_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMITS["function"] + 1))
    path = tmp_path / "long.py"
    path.write_text(f"def long():\n{body}\n")
    assert [u for u in _units(path) if u[2] > LIMITS["function"]]


def test_readme_is_short_and_every_relative_link_resolves():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(docs[0].read_text().splitlines()) <= README_MAX_LINES
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
            elif not path.is_relative_to(REPO):
                broken.append(f"{doc.relative_to(REPO)} -> {target} (outside the repo)")
    assert not broken, broken


def test_pyproject_names_only_paths_that_exist():
    text = (REPO / "pyproject.toml").read_text()
    named = re.findall(r"(?<![\w.])((?:scripts|\.ci|tests|docs|benchmarks|conf)/[\w./-]+)", text)
    assert named, "the check finds the paths pyproject.toml names"
    missing = [p for p in (n.rstrip(".") for n in named) if not (REPO / p).exists()]
    assert not missing, missing
