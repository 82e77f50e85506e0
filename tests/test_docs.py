"""The docs stand alone: every file the repository's code and docs cite is in the repository.

A citation is a repository path with a file extension (`docs/GENERATION.md`,
`benchmarks/results/2026-11-28.md`, `jaxllm/kernels/qmatmul_cpu.cc`) written in a module, a
script or a markdown file. Test modules are not scanned: they name missing files on purpose.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCANNED = (".py", ".md", ".sh", ".cc", ".toml")
SKIP_DIRS = {".git", ".jax_cache", "__pycache__", ".pytest_cache", ".hypothesis", "out", "build"}
TOP = ("docs", "benchmarks", "tests", "jaxllm", "configs", "notebooks", ".ci", "shared")
CITATION = re.compile(r"(?<![\w/$.-])((?:%s)/[\w./-]*\.(?:md|py|json|cc|sh|ipynb|model|safetensors))" % "|".join(map(re.escape, TOP)))


def scanned_files() -> list[Path]:
    files = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in SCANNED and not (rel.parts[0] == "tests" and path.name.startswith("test_")):
            files.append(path)
    return files


def citations(path: Path) -> list[str]:
    return [m.group(1) for m in CITATION.finditer(path.read_text(encoding="utf-8", errors="replace"))]


def test_the_scan_finds_the_citations_it_is_meant_to_check():
    cited = {c for path in scanned_files() for c in citations(path)}
    assert {"docs/GENERATION.md", "docs/ARCHITECTURE.md", "jaxllm/kernels/qmatmul_cpu.cc"} <= cited
    assert CITATION.findall("see shared/SAMPLING.md and docs/X.md") == ["shared/SAMPLING.md", "docs/X.md"]


def history(path: Path) -> bool:
    """Dated benchmark records name files as they were that day (a module may have moved since)."""
    return path.parent == REPO / "benchmarks" / "results"


def test_every_cited_file_is_in_the_repository():
    missing = sorted(
        f"{path.relative_to(REPO)} cites {cited}"
        for path in scanned_files() for cited in citations(path)
        if not (REPO / cited).is_file() and not (history(path) and not cited.startswith("shared/"))
    )
    assert missing == []
