"""The lock (constraints.txt) that `make setup`, CI and k8s/Dockerfile install from: it pins every
dependency pyproject.toml declares at a version the declaration allows, and leaves torch, its
CUDA packages and the project itself to the installer."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
NOT_LOCKED = re.compile(r"^(torch|triton|nvidia-.*|finetune-lab)$")


def _lock() -> dict[str, str]:
    pins = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"constraints.txt:{number}: not NAME==VERSION: {line}"
        pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[Requirement]:
    """pyproject.toml's dependencies and its `test` extra: what CI installs (`gpu` needs CUDA)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_lock_pins_every_declared_dependency_within_its_bounds():
    pins = _lock()
    problems = []
    for req in _declared():
        name = canonicalize_name(req.name)
        if NOT_LOCKED.match(name) or (req.marker and not req.marker.evaluate()):
            continue
        if name not in pins:
            problems.append(f"{req}: not in constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: constraints.txt has {pins[name]}")
    assert not problems, "run `make lock`: " + "; ".join(problems)


def test_lock_leaves_torch_and_the_project_out():
    assert [name for name in _lock() if NOT_LOCKED.match(name)] == []


def test_constraints_for_torch_pin_the_installed_build_and_yield_its_requirements():
    torch_needs = sorted({canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires("torch")})
    assert torch_needs, "torch declares no requirements"
    # Spelled as pip freeze may spell it (case, underscores): still recognised as torch's.
    torch_dep = torch_needs[0].upper().replace("-", "_") + "==0.1"
    lock = f"# comment\n{torch_dep}\nray==2.60.0\n"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "constraints_for_torch.py"), "/dev/stdin"],
                            input=lock, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert f"torch=={importlib.metadata.version('torch')}" in lines
    assert "ray==2.60.0" in lines and "# comment" in lines
    assert torch_dep not in lines


def test_image_installs_what_ci_tests():
    """k8s/Dockerfile installs from the lock, with CI's torch, and the Ray it locks is the image's
    and the cluster's (a driver and a cluster on different Ray versions cannot talk)."""
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in dockerfile and "scripts/constraints_for_torch.py" in dockerfile
    torch_pin = re.search(r"^TORCH \?= (\S+)$", makefile, re.MULTILINE).group(1)
    assert f"ARG TORCH={torch_pin}\n" in dockerfile
    image_ray = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([\d.]+)-", dockerfile, re.MULTILINE).group(1)
    cluster = yaml.safe_load((ROOT / "k8s" / "base" / "raycluster.yaml").read_text())
    assert _lock()["ray"] == image_ray == cluster["spec"]["rayVersion"]
