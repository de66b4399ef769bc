"""Imports go one way: the import-linter contracts of pyproject.toml hold for the package.

The graph counts imports inside functions and under ``TYPE_CHECKING`` (the second test proves it with the
project's own options on a two-module package), so a circle cannot hide behind a late import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_RUN = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports({config!r}, no_cache=True))"


def lint(directory: Path, config: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``directory`` (imported from there, not from an installed copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", _RUN.format(config=config)], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_import_contracts() -> None:
    result = lint(ROOT, "pyproject.toml")
    print(result.stdout, result.stderr)  # the broken contracts, import by import
    assert result.returncode == 0, "import contracts broken (see the captured output for each import)"


def test_late_and_type_checking_imports_count(tmp_path: Path) -> None:
    project = (ROOT / "pyproject.toml").read_text()
    options = project.split("[tool.importlinter]\n", 1)[1].split("[[tool.importlinter.contracts]]", 1)[0]
    options = options.replace('root_package = "ofbdeploy"', 'root_package = "layered"')
    assert 'root_package = "layered"' in options  # the project's own graph options, on another package
    package = tmp_path / "layered"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "high.py").write_text("")
    (package / "late.py").write_text("def f():\n    from layered import high\n")
    (package / "typing_only.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from layered import high\n")
    (package / "low.py").write_text("")
    (tmp_path / "layers.toml").write_text(
        f"[tool.importlinter]\n{options}\n[[tool.importlinter.contracts]]\nname = \"layers\"\ntype = \"layers\"\n"
        'layers = ["layered.high", "layered.late | layered.typing_only | layered.low"]\n')
    result = lint(tmp_path, "layers.toml")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "layered.late -> layered.high" in result.stdout
    assert "layered.typing_only -> layered.high" in result.stdout
