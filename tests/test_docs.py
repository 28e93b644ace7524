"""The repository is self-contained: code cites its own algorithm reference, docs/algorithms.md.

* No source, config, benchmark or test file cites the design notes that live outside the repository.
* Every ``docs/algorithms.md §N[.M]`` citation names a numbered heading of docs/algorithms.md
  (``## 1. Title`` -> section 1, ``### 1.1 Title`` -> section 1.1).
"""

from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "algorithms.md")
SCANNED_DIRS = ("genalign", "rewards", "pipelines", "configs", "benchmarks", "tests")
THIS_FILE = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, "/")
TEXT_SUFFIXES = (".py", ".yaml", ".yml", ".md", ".txt", ".toml", ".cfg", ".json", ".sh", ".html")

HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)
# "docs/algorithms.md §9.2", "docs/algorithms.md §9.8, §9.9 and §6"
CITATION = re.compile(r"docs/algorithms\.md((?:\s*(?:,|and)?\s*§\s*\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")


def _repo_files(dirs):
    """Tracked and untracked-but-not-ignored files under ``dirs`` (relative, '/'-separated); a plain
    directory walk when git is unavailable."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *dirs],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if f]
        if files:
            return [f for f in files if os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for d in dirs:
        for base, subdirs, names in os.walk(os.path.join(ROOT, d)):
            subdirs[:] = [s for s in subdirs if s != "__pycache__" and not s.startswith(".")]
            files += [os.path.relpath(os.path.join(base, n), ROOT).replace(os.sep, "/") for n in names]
    return files


def _text_files(dirs, extra=()):
    for rel in list(_repo_files(dirs)) + [e for e in extra if os.path.isfile(os.path.join(ROOT, e))]:
        if rel == THIS_FILE or not rel.endswith(TEXT_SUFFIXES):
            continue
        with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as fh:
            yield rel, fh.read()


def doc_sections():
    with open(DOC, encoding="utf-8") as fh:
        return set(HEADING.findall(fh.read()))


def citations(text):
    """Section numbers cited as ``docs/algorithms.md §N`` in ``text``."""
    return [s for group in CITATION.findall(text) for s in SECTION.findall(group)]


def test_citation_parser():
    assert citations("see docs/algorithms.md §1.1.") == ["1.1"]
    assert citations("(docs/algorithms.md §9.8, §9.9 and §6)") == ["9.8", "9.9", "6"]
    assert citations("docs/algorithms.md without a section") == []
    assert HEADING.findall("## 1. Steps\n### 1.1 SDE\n#### 10.2. Sets\n## References\n") == ["1", "1.1", "10.2"]


def test_algorithms_doc_exists_with_numbered_sections():
    sections = doc_sections()
    for top in map(str, range(1, 11)):
        assert top in sections, f"docs/algorithms.md lacks section '## {top}.'"


# the external design notes' file name, assembled so that this test does not mention it itself
EXTERNAL_NOTES = "ALGORITHMS" + "." + "md"


def test_no_reference_to_external_design_notes():
    offenders = [f"{rel}:{n}" for rel, text in _text_files(SCANNED_DIRS)
                 for n, line in enumerate(text.splitlines(), 1) if EXTERNAL_NOTES in line]
    assert not offenders, ("these files cite design notes that are not part of the repository; cite "
                           f"docs/algorithms.md §N or a paper instead: {offenders}")


def test_docs_citations_name_existing_sections():
    sections = doc_sections()
    cited, missing = 0, []
    for rel, text in _text_files(SCANNED_DIRS, extra=("README.md", "docs/algorithms.md")):
        for n, line in enumerate(text.splitlines(), 1):
            for sec in citations(line):
                cited += 1
                if sec not in sections:
                    missing.append(f"{rel}:{n} cites §{sec}")
    assert cited > 0, "no docs/algorithms.md citation found in the code"
    assert not missing, f"citations of sections that docs/algorithms.md does not have: {missing}"


def test_docs_directory_is_not_ignored():
    try:
        res = subprocess.run(["git", "check-ignore", "-q", "docs/algorithms.md"], cwd=ROOT, capture_output=True)
    except OSError:
        return
    if res.returncode == 128:  # not a git checkout
        return
    assert res.returncode == 1, "docs/algorithms.md is ignored by git; it must be part of the repository"


def test_readme_result_tables_are_generated_from_the_benchmark_json():
    """README tables between <!-- table:NAME --> markers equal benchmarks/readme_tables.py's output."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import readme_tables
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "README.md")) as fh:
        blocks = readme_tables.readme_blocks(fh.read())
    tables = readme_tables.generate()
    assert set(blocks) == set(tables), "every generated table has a README block and vice versa"
    for name, table in tables.items():
        assert blocks[name] == table, f"README table {name} is stale: run python benchmarks/readme_tables.py --write"
