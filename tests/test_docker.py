"""docker/Dockerfile, read as text (no Docker engine needed): the `python -c` checks in its RUN lines
import torch before anything that links against it, and hadolint finds nothing (when installed)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"

# Modules whose import needs torch's shared libraries loaded first: the CUDA extensions (built without
# an rpath to torch/lib, so dlopen cannot find libc10.so on its own) and packages that import them.
NEEDS_TORCH_FIRST = {
    "grouped_gemm_backend",
    "megablocks_ops",
    "grouped_gemm",
    "megablocks",
    "deepspeed",
    "moetrain",
}


def _instructions(text: str) -> list[str]:
    """Dockerfile instructions with their `\\` line continuations joined, comment lines dropped."""
    out: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # also inside a continued instruction, as Docker does
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return [i for i in out if i.strip()]


def _python_checks(text: str) -> list[str]:
    """The code of every `python -c "..."` in a RUN instruction."""
    snippets = []
    for inst in _instructions(text):
        if inst.startswith("RUN "):
            snippets += re.findall(r'python3? -c "([^"]*)"', inst)
    return snippets


def _imported_modules(code: str) -> list[str]:
    """Top-level module names in import order."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module.split(".")[0])
    return names


def test_python_checks_import_torch_first():
    checks = _python_checks(DOCKERFILE.read_text())
    assert len(checks) >= 3, checks  # torch version, the extensions, moetrain
    extension_checks = 0
    for code in checks:
        mods = _imported_modules(code)
        dependent = [m for m in mods if m in NEEDS_TORCH_FIRST]
        if not dependent:
            continue
        extension_checks += "megablocks_ops" in mods
        assert "torch" in mods and mods.index("torch") < mods.index(dependent[0]), (
            f"import torch before {dependent[0]}: {code}"
        )
    assert extension_checks == 1, checks  # the build still checks that the extensions load


def test_import_order_check_catches_the_wrong_order():
    bad = 'RUN python -c "import grouped_gemm_backend, torch; \\\nprint(1)"\n'
    (code,) = _python_checks(bad)
    assert _imported_modules(code) == ["grouped_gemm_backend", "torch"]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint_clean():
    res = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
