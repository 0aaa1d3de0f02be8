"""docker/Dockerfile: hadolint-clean, and every version it installs agrees with pyproject.toml.

No Docker engine is needed: the image itself is not built here. These checks catch the two
mistakes a Dockerfile edit can make without anyone building it: a lint regression and a version
that drifts from the project's pins (one side bumped, the other forgotten).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

DOCKERFILE = REPO / "docker" / "Dockerfile"
PYPROJECT = REPO / "pyproject.toml"
BASE_IMAGE = re.compile(
    r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn(?P<cudnn>\d+)-devel$"
)
PIN = re.compile(r"""(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s"',;]+)""")


def _norm(name: str) -> str:
    """PEP 503 name normalisation: Foo_Bar, foo-bar and foo.bar are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_pins(text: str) -> dict[str, str]:
    """`name==version` requirements of pyproject.toml (dependencies and optional ones)."""
    project = tomllib.loads(text)["project"]
    reqs = list(project.get("dependencies", []))
    for group in project.get("optional-dependencies", {}).values():
        reqs += group
    pins = {}
    for req in reqs:
        m = PIN.fullmatch(req.split(";")[0].strip())
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comment lines dropped and continuations joined."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\[ \t]*\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_pins(text: str) -> tuple[str, dict[str, str]]:
    """The base image (ARGs substituted) and every `name==version` a RUN pip-installs."""
    args: dict[str, str] = {}

    def subst(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), s)

    base, pins = "", {}
    for word, rest in instructions(text):
        if word == "ARG":
            name, eq, default = rest.partition("=")
            if eq and name not in args:  # a redeclaration without default keeps the value
                args[name] = default.strip().strip('"')
        elif word == "FROM":
            base = subst(rest.split()[0])
        elif word == "RUN" and "pip install" in rest:
            for m in PIN.finditer(subst(rest)):
                pins[_norm(m.group(1))] = m.group(2)
    return base, pins


def version_problems(dockerfile: str, pyproject: str) -> list[str]:
    """Everything in the Dockerfile that disagrees with pyproject.toml (empty when they agree)."""
    want = pyproject_pins(pyproject)
    base, pins = dockerfile_pins(dockerfile)
    problems = []
    m = BASE_IMAGE.match(base)
    if not m:
        problems.append(
            f"base image {base!r} is not pytorch/pytorch:<torch>-cuda<x>-cudnn<y>-devel"
        )
    elif m["torch"] != want.get("torch"):
        problems.append(f"base image has torch {m['torch']}, pyproject pins {want.get('torch')}")
    if "deepspeed" not in pins:
        problems.append("the Dockerfile does not pip-install a pinned deepspeed")
    for name, version in sorted(pins.items()):
        if name not in want:
            problems.append(f"Dockerfile pins {name}=={version}; pyproject.toml does not pin it")
        elif want[name] != version:
            problems.append(f"Dockerfile pins {name}=={version}, pyproject.toml {want[name]}")
    return problems


def test_hadolint_passes_without_findings() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), (
        f"{hadolint} missing: install the dev extras (pip install -e '.[dev]')"
    )
    # failure threshold "style": any finding at all, down to style hints, fails the test.
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_versions_match_pyproject() -> None:
    dockerfile, pyproject = DOCKERFILE.read_text(), PYPROJECT.read_text()
    assert version_problems(dockerfile, pyproject) == []
    # The checks above saw real pins, not nothing.
    base, pins = dockerfile_pins(dockerfile)
    assert BASE_IMAGE.match(base) and pins["deepspeed"] == pyproject_pins(pyproject)["deepspeed"]


def _bump(version: str) -> str:
    head, _, last = version.rpartition(".")
    return f"{head}.{int(last) + 1}"


@pytest.mark.parametrize("package", ["torch", "deepspeed"])
def test_bumping_one_side_only_is_caught(package: str) -> None:
    dockerfile, pyproject = DOCKERFILE.read_text(), PYPROJECT.read_text()
    old = pyproject_pins(pyproject)[package]
    new = _bump(old)
    arg = {"torch": "TORCH_VERSION", "deepspeed": "DEEPSPEED_VERSION"}[package]

    pyproject_bumped = pyproject.replace(f'"{package}=={old}"', f'"{package}=={new}"')
    dockerfile_bumped = dockerfile.replace(f"ARG {arg}={old}", f"ARG {arg}={new}")
    assert pyproject_bumped != pyproject and dockerfile_bumped != dockerfile

    assert any(new in p for p in version_problems(dockerfile, pyproject_bumped))
    assert any(new in p for p in version_problems(dockerfile_bumped, pyproject))
    # Both sides bumped together agree again.
    assert version_problems(dockerfile_bumped, pyproject_bumped) == []


def test_extra_pins_must_come_from_pyproject() -> None:
    dockerfile = DOCKERFILE.read_text().replace(
        "pip install -e .", 'pip install "ninja==1.11.1" -e .'
    )
    assert version_problems(dockerfile, PYPROJECT.read_text()) == [
        "Dockerfile pins ninja==1.11.1; pyproject.toml does not pin it"
    ]
