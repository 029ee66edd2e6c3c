"""The code keeps its shape: a thin training loop, and DeepSpeed patched in one place only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moetrain"
PATCHES = PACKAGE / "distributed" / "deepspeed_patches.py"


def deepspeed_patches(source: str) -> list[str]:
    """Assignments that change a DeepSpeed object's behaviour from the outside: a function put in
    place of another object's attribute (``opt.step = partial(...)``, a local def, a lambda), the
    engine's all-reduce switch, or anything assigned into the ``deepspeed`` module itself."""
    tree = ast.parse(source)
    local_defs = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            base = target
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if target is not base and isinstance(base, ast.Name) and base.id == "deepspeed":
                found.append(ast.unparse(target))
                continue
            if not isinstance(target, ast.Attribute):
                continue
            if isinstance(target.value, ast.Name) and target.value.id in ("self", "cls"):
                continue  # an object's own attribute
            value = node.value
            function = (
                isinstance(value, ast.Lambda)
                or (isinstance(value, ast.Name) and value.id in local_defs)
                or (
                    isinstance(value, ast.Call)
                    and ast.unparse(value.func).split(".")[-1] in ("partial", "wraps", "MethodType")
                )
            )
            if function or target.attr == "enable_backward_allreduce":
                found.append(ast.unparse(target))
    return found


def test_the_training_loop_stays_thin() -> None:
    lines = len((PACKAGE / "trainer" / "loop.py").read_text().splitlines())
    assert lines <= 300, f"trainer/loop.py has {lines} lines: move a concern into a component beside it"


def test_deepspeed_is_patched_only_in_deepspeed_patches() -> None:
    elsewhere = {
        str(p.relative_to(ROOT)): hits
        for p in sorted(PACKAGE.rglob("*.py"))
        if p != PATCHES and (hits := deepspeed_patches(p.read_text()))
    }
    assert not elsewhere, f"DeepSpeed patched outside {PATCHES.relative_to(ROOT)}: {elsewhere}"
    # the file that holds them is found by the same check (so the check can see a patch at all)
    assert set(deepspeed_patches(PATCHES.read_text())) >= {
        "deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']",
        "engine.enable_backward_allreduce",
        "opt.step",
    }


def test_the_patch_check_sees_each_kind_of_patch() -> None:
    """Negative controls: each way of patching is reported, an object's own state is not."""
    patched = """
import functools
def build(engine, opt):
    def guarded(*a):
        return None
    opt.step = guarded
    engine.optimizer.step = functools.partial(print, opt)
    engine.backward = lambda loss: None
    engine.enable_backward_allreduce = False
    deepspeed.comm.all_reduce = None
"""
    assert deepspeed_patches(patched) == [
        "opt.step",
        "engine.optimizer.step",
        "engine.backward",
        "engine.enable_backward_allreduce",
        "deepspeed.comm.all_reduce",
    ]
    assert (
        deepspeed_patches("class T:\n    def f(self, model):\n        self.step = 0\n        model.x = 1\n")
        == []
    )
