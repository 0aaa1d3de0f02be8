"""The package's layer contract (pyproject.toml, `lint-imports`): kept by the code as it is, and
broken by each kind of import it forbids (checked on a copy of the package with one import
added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the package under `root`, with `root`'s pyproject.toml."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_layers() -> None:
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # The engine reaching up into training.
        ("engine/ddp.py", "from pretrain.training import loop", "Layers"),
        # The model importing anything of ours, or a framework.
        ("model/gpt.py", "import pretrain.dist", "Layers"),
        ("model/gpt.py", "import accelerate", "The model is pure PyTorch"),
        # A library module importing a command.
        ("evaluation/split.py", "from pretrain import eval", "Layers"),
        # A cycle inside one package.
        ("sweep/lock.py", "from pretrain.sweep import study", "No import cycles"),
    ],
)
def test_each_forbidden_import_breaks_the_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    shutil.copytree(
        REPO / "pretrain", tmp_path / "pretrain", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "pretrain" / module, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    broken_lines = [ln for ln in proc.stdout.splitlines() if ln.endswith(" BROKEN")]
    assert any(ln.startswith(broken) for ln in broken_lines), proc.stdout
