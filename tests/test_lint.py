import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_finds_nothing():
    """Undefined names, unused imports and variables, redefinitions (ruff's F rules, pyproject.toml)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: it is part of the test extras (pip install -e '.[test]')")
    res = subprocess.run([ruff, "check", "--output-format", "concise", "src", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
