"""The dependency files agree: setup.py's floors, scripts/constraints.txt's pins, the Dockerfile."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "scripts" / "constraints.txt"
DOCKERFILE = REPO / "docker" / "Dockerfile"
# torch comes from TORCH_SPEC or the Docker base image, with what only it needs: never pinned here
NOT_PINNED = re.compile(r"^(torch|triton|nvidia-.*|sympy|mpmath|networkx|jinja2|vlmoe)$")


def pins() -> dict[str, str]:
    """Package (canonical name) -> pinned version, from scripts/constraints.txt."""
    out = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"constraints.txt: not NAME==VERSION: {line!r}"
        out[canonicalize_name(name)] = version
    return out


def setup_requirements() -> list[Requirement]:
    """install_requires and every extra of setup.py, read without running it."""
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text(encoding="utf-8")))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    extras = [r for group in keywords.get("extras_require", {}).values() for r in group]
    return [Requirement(r) for r in [*keywords["install_requires"], *extras]]


def test_constraints_pin_everything_but_torch():
    pinned = pins()
    assert not [name for name in pinned if NOT_PINNED.match(name)]
    # every requirement of the project is pinned (except torch), and its pin is within setup.py's range
    for req in setup_requirements():
        name = canonicalize_name(req.name)
        if NOT_PINNED.match(name):
            continue
        assert name in pinned, f"{name} is a requirement but has no pin in scripts/constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"setup.py wants {req}, scripts/constraints.txt pins {pinned[name]}"


def test_dockerfile_installs_with_the_constraints_and_pins_deepspeed_and_tutel():
    text = DOCKERFILE.read_text(encoding="utf-8")
    deepspeed = re.search(r"^ARG DEEPSPEED_VERSION=(\S+)$", text, re.M)
    assert deepspeed and deepspeed.group(1) == pins()["deepspeed"], "docker/Dockerfile's DeepSpeed != the constraints'"
    assert re.search(r"^ARG TUTEL_COMMIT=[0-9a-f]{40}$", text, re.M)
    installs = [line for line in text.splitlines() if re.search(r"\bpip install\b", line) and "tutel" not in line]
    assert installs and all("-c scripts/constraints.txt" in line for line in installs), installs


def test_setup_env_installs_with_the_constraints_by_default():
    text = (REPO / "scripts" / "setup_env.sh").read_text(encoding="utf-8")
    assert "CONSTRAINTS=${VLMOE_CONSTRAINTS-scripts/constraints.txt}" in text
    assert '-c "$CONSTRAINTS"' in text
