"""The docs stay true to the tree: every module and recipe named, every cited file and heading there,
every relative link resolving, the README and benchmarks index short, results files dated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [
    ROOT / "README.md",
    ROOT / "tests" / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted(RESULTS.glob("*.md")),
]
SOURCES = [p for d in ("moetrain", "tests", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")]
RECIPES = sorted(p.stem for p in (ROOT / "moetrain" / "configs" / "experiment").glob("*.yaml"))


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_readme_and_benchmarks_index_stay_short() -> None:
    assert len(_text(ROOT / "README.md").splitlines()) <= 160, (
        "README.md is a product page: details go to docs/"
    )
    assert len(_text(ROOT / "benchmarks" / "README.md").splitlines()) <= 150, (
        "benchmarks/README.md is an index: a measurement series goes to benchmarks/results/"
    )


def test_architecture_names_every_module_and_recipe() -> None:
    arch = _text(ROOT / "docs" / "ARCHITECTURE.md")
    modules = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "moetrain").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    ]
    assert modules
    missing = [m for m in modules if Path(m).name not in arch]
    assert not missing, f"docs/ARCHITECTURE.md does not list {missing}"
    assert RECIPES
    for doc in ("ARCHITECTURE.md", "CONFIG.md"):
        text = _text(ROOT / "docs" / doc)
        missing = [r for r in RECIPES if not re.search(rf"\b{re.escape(r)}\b", text)]
        assert not missing, f"docs/{doc} does not name the recipes {missing}"


def test_results_files_are_named_and_dated() -> None:
    files = sorted(RESULTS.glob("*.md"))
    assert files
    for f in files:
        m = re.fullmatch(r"[a-z0-9_]+_([a-z0-9-]+)_(\d{4}-\d{2}-\d{2})\.md", f.name)
        assert m, f"{f.name}: name it <topic>_<machine>_<date>.md"
        head = _text(f).splitlines()[:8]
        assert head[0].startswith("# "), f"{f.name}: starts with a title"
        for field in ("Machine", "Date", "Command"):
            assert any(line.startswith(f"- {field}: ") for line in head), f"{f.name}: no '- {field}:' line"
        assert any(line.startswith(f"- Date: {m.group(2)}") for line in head), (
            f"{f.name}: Date differs from name"
        )


def test_cited_results_files_exist() -> None:
    cited = set()
    for path in [*SOURCES, *DOCS, ROOT / "Makefile"]:
        cited |= {(path, c) for c in re.findall(r"benchmarks/results/([\w.-]+\.md)", _text(path))}
        cited |= {
            (path, c) for c in re.findall(r"\]\((?:results/)?([\w.-]+_\d{4}-\d{2}-\d{2}\.md)\)", _text(path))
        }
    assert cited
    missing = sorted(f"{p.relative_to(ROOT)} -> {c}" for p, c in cited if not (RESULTS / c).is_file())
    assert not missing, missing


@pytest.mark.parametrize("doc", ["tests/README.md", "docs/ARCHITECTURE.md"])
def test_cited_headings_exist(doc: str) -> None:
    """A citation like (tests/README.md, "Numerics") names a heading of that file."""
    headings = [line.lstrip("#").strip() for line in _text(ROOT / doc).splitlines() if line.startswith("#")]
    cites = []
    for path in [*SOURCES, *DOCS]:
        for heading in re.findall(rf'{re.escape(doc)}, "([^"]+)"', _text(path)):
            cites.append((path.relative_to(ROOT).as_posix(), heading))
    missing = [c for c in cites if not any(h.startswith(c[1]) for h in headings)]
    assert not missing, f"headings cited but not in {doc}: {missing}"


def test_relative_links_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _text(doc)):
            if re.match(r"[a-z]+://", target):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken
