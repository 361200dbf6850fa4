"""The repository carries its own documentation: no README, doc, config or source file points outside it.

Checked in every text file of the repository: no path into a sibling folder of the checkout (`../shared`);
every Markdown document named (`docs/methods.md`, `datasets/README.md`, a link `[x](design.md#anchor)`)
exists, with the exact case, relative to the naming file or to the repository root, and so does the heading
an anchor names; every "principle N" exists in docs/design.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["README.md", "Makefile", "setup.py", "pyproject.toml", ".ci", "configs", "csrc", "datasets", "docs",
           "peft_d2", "requirements", "tests", "tools"]
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".txt", ".sh", ".toml", ".cfg", ".cpp", ".h", ".cu", ".cuh", ""}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", "build", "output"}
SHALLOW = {"datasets"}  # its scripts and README only: the datasets themselves may live below it (the default root)

# Markdown files the tools write at run time (not documents of the repository): tools/demo.py's output/demo/
# and the GPU check's results (tools/gpu_check.py).
GENERATED = {"results.md", "gpu_check_results.md"}

OUTSIDE = re.compile(r"\.\./+shared\b|\.\./\.\./")
# The one file that may name ../shared: CI's script, which points the HIP-CPU emulation of the CUDA kernels at the
# shared vendor folder (third-party source the repository must not carry).
SHARED_NAMED_BY = {".ci/run"}
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
MARKDOWN_REF = re.compile(r"(?<![\w/.{-])((?:\.{1,2}/)*[\w][\w./-]*\.md)(#[\w-]+)?(?![\w])")
PRINCIPLE = re.compile(r"\bprinciples? (\d+)", re.IGNORECASE)


def _text_files():
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            yield path
        for folder, dirs, files in os.walk(path):
            dirs[:] = [] if entry in SHALLOW else sorted(
                d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
            for name in sorted(files):
                p = Path(folder) / name
                if p.suffix in TEXT_SUFFIXES and p.resolve() != Path(__file__).resolve():
                    yield p


def _exists_exactly(path: Path) -> bool:
    """`path` exists with exactly this spelling (case-insensitive file systems would accept METHODS.md)."""
    path = Path(os.path.normpath(path))
    try:
        rel = path.relative_to(ROOT)
    except ValueError:
        return False  # outside the repository
    here = ROOT
    for part in rel.parts:
        if not here.is_dir() or part not in os.listdir(here):
            return False
        here = here / part
    return True


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(md: Path) -> set:
    return {_slug(line.lstrip("#")) for line in md.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def _principles() -> int:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## Principles", 1)[1].split("\n## ", 1)[0]
    return len(re.findall(r"^\d+\. ", section, re.MULTILINE))


def _problems(path: Path, text: str | None = None) -> list[str]:
    """The references of `path` (or of `text`, as if it were that file's) that do not resolve."""
    rel = path.relative_to(ROOT).as_posix()
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return []
    problems = []
    n_principles = _principles()
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{rel}:{lineno}"
        if OUTSIDE.search(line) and not (rel in SHARED_NAMED_BY and "../../" not in line):
            problems.append(f"{where}: points outside the repository: {line.strip()}")
        line = URL.sub("", line)
        for ref, anchor in MARKDOWN_REF.findall(line):
            candidates = [path.parent / ref, ROOT / ref]
            target = next((c for c in candidates if _exists_exactly(c)), None)
            if target is None:
                if os.path.basename(ref) not in GENERATED:
                    problems.append(f"{where}: names {ref}, which is not in the repository")
            elif anchor and anchor[1:] not in _anchors(target):
                problems.append(f"{where}: {ref}{anchor}: no such heading in {target.relative_to(ROOT)}")
        for number in PRINCIPLE.findall(line):
            if not 1 <= int(number) <= n_principles:
                problems.append(f"{where}: principle {number}, but docs/design.md has {n_principles}")
    return problems


def test_no_reference_points_outside_the_repository():
    problems = [p for f in _text_files() for p in _problems(f)]
    assert not problems, "references that do not resolve inside the repository:\n" + "\n".join(problems)


def test_the_docs_exist_and_link_each_other():
    for name in ("methods.md", "design.md"):
        assert (ROOT / "docs" / name).is_file(), name
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/methods.md" in readme and "docs/design.md" in readme
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert "[methods.md](methods.md)" in design and "(adding_a_method.md)" in design
    assert _principles() == 7


@pytest.mark.parametrize("line, expected", [
    ("see ../shared/METHODS.md", 2),            # outside, and a missing document
    ("see METHODS.md section 0", 1),
    ("DESIGN.md principle 4", 1),
    ("docs/design.md, principle 9", 1),         # no principle 9
    ("[x](docs/methods.md#no-such-heading)", 1),
    ("[x](docs/methods.md#lora) and datasets/README.md and https://example.org/a.md", 0),
    ("docs/adding_a_method.md (pending) and [guide](adding_a_method.md)", 0),
    ("[guide](../adding_a_method.md)", 1),      # not the pending document
])
def test_the_checker_finds_what_it_should(line, expected):
    problems = _problems(ROOT / "docs" / "probe.md", line)
    assert len(problems) == expected, problems


def test_only_ci_names_the_shared_folder():
    line = 'export PEFT_D2_HIP_CPU="$(cd ../shared/vendor/hip-cpu && pwd)"'
    assert _problems(ROOT / ".ci" / "run", line) == []
    assert len(_problems(ROOT / "tests" / "probe.py", line)) == 1
    assert len(_problems(ROOT / ".ci" / "run", "cd ../../elsewhere")) == 1
