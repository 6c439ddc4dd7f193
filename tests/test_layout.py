"""The layout a reader can hold in mind: the formatter owns it, no top-level module is longer than
600 lines, and no function of the entry scripts and tools is longer than 50."""

import ast
import glob
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

TOP_FLOOR = ("train.py", "eval.py", "bench.py", "tools/*.py")  # what imports the rest


def sources(*patterns):
    return sorted(path for pattern in patterns for path in glob.glob(os.path.join(ROOT, pattern)))


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff (the formatter, an optional extra) is not installed")
def test_the_formatter_owns_the_layout():
    """`ruff format --check` (pyproject.toml's line length) finds nothing to change, and at most a
    handful of statements opt out with `# fmt: skip` (tables that read better aligned)."""
    done = subprocess.run(["ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    skips = sum(open(path, encoding="utf-8").read().count("fmt: skip") for path in sources("*.py", "*/*.py"))
    assert skips <= 10, skips


def test_no_top_level_module_is_longer_than_600_lines():
    """Every .py at the top of the repository has at most 600 lines."""
    lengths = {os.path.basename(p): sum(1 for _ in open(p, encoding="utf-8")) for p in sources("*.py")}
    assert max(lengths.values()) <= 600, {name: n for name, n in lengths.items() if n > 600}


def test_no_function_of_the_top_floor_is_longer_than_50_lines():
    """The entry scripts and the tools (the modules that import the others) have no function over
    50 lines, its docstring included."""
    long = []
    for path in sources(*TOP_FLOOR):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}")
    assert not long, long
