"""Every install this repository runs takes exact, hashed versions from the lock files.

A fresh machine must install what CI last passed with, not whatever is newest: these
tests read the install scripts, the Dockerfile and the lock files as text and check that
they agree with each other and with pyproject.toml's ranges.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, Version]:
    """name -> pinned version; fails on a requirement that is not pinned with a hash."""
    text = lock.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1])
    found: dict[str, Version] = {}
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        match = PIN.match(entry)
        assert match, f"{lock.name}: not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"{lock.name}: {match.group(1)} has no hash"
        found[canonical(match.group(1))] = Version(match.group(2))
    return found


def project() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    ("lock", "groups"),
    [(RUNTIME_LOCK, ["dependencies"]), (DEV_LOCK, ["dependencies", "dev"])],
)
def test_lock_pins_every_declared_package_within_its_range(lock: Path, groups: list[str]) -> None:
    locked = pins(lock)
    meta = project()
    declared: list[str] = []
    for group in groups:
        if group == "dependencies":
            declared += meta["dependencies"]  # type: ignore[operator]
        else:
            declared += meta["optional-dependencies"][group]  # type: ignore[index]
    for line in declared:
        requirement = Requirement(line)
        name = canonical(requirement.name)
        assert name in locked, f"{lock.name} does not pin {name}"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{lock.name}: {name}=={locked[name]} is outside {requirement.specifier}"
        )


def test_locks_agree_on_shared_packages_and_pin_the_build_backend() -> None:
    runtime, dev = pins(RUNTIME_LOCK), pins(DEV_LOCK)
    for name, version in runtime.items():
        assert dev.get(name) == version, f"{name}: {version} vs {dev.get(name)}"
    for locked in (runtime, dev):
        assert "setuptools" in locked  # --no-build-isolation builds the project with it


@pytest.mark.parametrize(
    ("path", "lock"),
    [
        ("scripts/test", "requirements-dev.lock"),
        ("scripts/demo", "requirements.lock"),
        ("Dockerfile", "requirements.lock"),
    ],
)
def test_every_install_uses_the_lock_and_resolves_nothing_else(path: str, lock: str) -> None:
    text = (ROOT / path).read_text()
    installs = [
        line for line in re.sub(r"\\\n\s*", " ", text).splitlines() if "pip install" in line
    ]
    assert installs, f"{path} installs nothing"
    assert any(f"--require-hashes -r {lock}" in line for line in installs), path
    for line in installs:
        assert "--require-hashes" in line or "--no-deps" in line, f"{path}: {line.strip()}"
        assert "--upgrade" not in line, f"{path}: {line.strip()}"


def test_ci_runs_the_readme_test_command() -> None:
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
