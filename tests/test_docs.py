"""The docs stand alone: every file the repository's code and docs cite is in the repository.

A citation is a relative path with a file extension (`docs/GENERATION.md`,
`benchmarks/results/2026-11-28.md`, `jaxllm/kernels/qmatmul_cpu.cc`) written in a module, a
script or a markdown file. One that starts at a top-level directory of the repository must name
a file there; any other must not leave the repository (`../`) or name a file that exists beside
the checkout instead of inside it. Test modules are not scanned: they name missing files on purpose.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCANNED = (".py", ".md", ".sh", ".cc", ".toml")
SKIP_DIRS = {".git", ".jax_cache", "__pycache__", ".pytest_cache", ".hypothesis", "out", "build"}
TOP = ("docs", "benchmarks", "tests", "jaxllm", "configs", "notebooks", ".ci")
CITATION = re.compile(r"(?<![\w/$.:~-])((?:\.\./)*[A-Za-z_.][\w.-]*/[\w./-]*\.(?:md|py|json|cc|sh|ipynb|model|safetensors))")


def scanned_files(repo: Path = REPO) -> list[Path]:
    files = []
    for path in repo.rglob("*"):
        rel = path.relative_to(repo)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in SCANNED and not (rel.parts[0] == "tests" and path.name.startswith("test_")):
            files.append(path)
    return files


def citations(path: Path) -> list[str]:
    return [m.group(1) for m in CITATION.finditer(path.read_text(encoding="utf-8", errors="replace"))]


def history(path: Path, repo: Path = REPO) -> bool:
    """Dated benchmark records name files as they were that day (a module may have moved since)."""
    return path.parent == repo / "benchmarks" / "results"


def unresolved(repo: Path = REPO) -> list[str]:
    """Citations that name no file in the repository: a repository path that is missing, a path
    out of it, or a path to a file beside the checkout."""
    bad = []
    for path in scanned_files(repo):
        for cited in citations(path):
            inside = (repo / cited).is_file()
            if cited.startswith("../") or (cited.split("/")[0] in TOP and not inside and not history(path, repo)) or (
                    not inside and (repo.parent / cited).is_file()):
                bad.append(f"{path.relative_to(repo)} cites {cited}")
    return sorted(bad)


def test_the_scan_finds_the_citations_it_is_meant_to_check(tmp_path):
    cited = {c for path in scanned_files() for c in citations(path)}
    assert {"docs/GENERATION.md", "docs/ARCHITECTURE.md", "jaxllm/kernels/qmatmul_cpu.cc"} <= cited
    # A checkout with a notes directory beside it: citing the notes, a missing repository file or
    # a path up and out is caught; a placeholder path (DIR/config.json) is not a citation of a file.
    repo, beside = tmp_path / "repo", tmp_path / "notes"
    (repo / "docs").mkdir(parents=True)
    beside.mkdir()
    (beside / "RULES.md").write_text("outside")
    (repo / "docs" / "A.md").write_text("ok")
    (repo / "README.md").write_text("see notes/RULES.md, docs/A.md, docs/B.md, ../x/y.md and DIR/config.json\n")
    assert unresolved(repo) == [
        "README.md cites ../x/y.md", "README.md cites docs/B.md", "README.md cites notes/RULES.md",
    ]


def test_every_cited_file_is_in_the_repository():
    assert unresolved() == []
