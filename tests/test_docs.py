"""The design lives in the repo (issue 14, item 1): no file points outside the clone for it, and
every "docs/<file>.md section N" citation, in code, tests, benchmarks, the README or the docs
themselves, names a file under docs/ and a numbered heading that file has. Inside docs/, a bare
"section N" refers to the same file and must resolve too."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = ("DESIGN" + ".md", ".." + "/shared")
# Without git (an unpacked sdist), walk the tree and skip what .gitignore would.
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".benchmarks",
    ".mypy_cache",
    ".ruff_cache",
}
SKIP_PATHS = {os.path.join("benchmarks", "results", d) for d in ("raw", "quick", "local")}

_NUMBER = r"\d+(?:\.\d+)*"
_SECTIONS = rf"sections?\s+({_NUMBER}(?:\s*(?:-|to|and|,)\s*{_NUMBER})*)"
CITATION = re.compile(rf"docs/([A-Za-z0-9_.-]+?\.md)(?:,?\s+{_SECTIONS})?")
BARE = re.compile(rf"\b{_SECTIONS}")
HEADING = re.compile(rf"^#{{1,6}}\s+({_NUMBER})\.?\s", re.M)


def repo_files():
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for here, dirs, files in os.walk(ROOT):
            rel = os.path.relpath(here, ROOT)
            dirs[:] = [
                d
                for d in dirs
                if d not in SKIP_DIRS
                and not d.endswith(".egg-info")
                and os.path.normpath(os.path.join(rel, d)) not in SKIP_PATHS
            ]
            names += [os.path.normpath(os.path.join(rel, f)) for f in files]
    return sorted(n for n in names if os.path.isfile(os.path.join(ROOT, n)))


def text_of(name):
    with open(os.path.join(ROOT, name), "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None  # binary (plots, the compiled extension)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def texts():
    found = {}
    for name in repo_files():
        text = text_of(name)
        if text is not None:
            found[name] = text
    return found


def numbers(spec):
    return re.findall(_NUMBER, spec)


def headings(doc):
    with open(os.path.join(DOCS, doc)) as f:
        return set(HEADING.findall(f.read()))


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


@pytest.fixture(scope="module")
def files():
    return texts()


def test_docs_exist_with_numbered_sections():
    for doc in ("math.md", "api.md", "backends.md", "dropout.md", "verified.md"):
        assert os.path.isfile(os.path.join(DOCS, doc)), f"docs/{doc} is missing"
        assert "1" in headings(doc), f"docs/{doc} has no heading numbered 1"


def test_no_reference_points_outside_the_repo(files):
    assert "README.md" in files and os.path.join("docs", "math.md") in files
    bad = [
        f"{name}:{line_of(text, m.start())}: {word}"
        for name, text in files.items()
        for word in FORBIDDEN
        for m in re.finditer(re.escape(word), text)
    ]
    assert not bad, "the design is in docs/; replace these references:\n" + "\n".join(bad)


def test_every_docs_citation_resolves(files):
    bad, count = [], 0
    for name, text in files.items():
        for m in CITATION.finditer(text):
            doc, spec = m.group(1), m.group(2)
            where = f"{name}:{line_of(text, m.start())}: {m.group(0)!r}"
            if not os.path.isfile(os.path.join(DOCS, doc)):
                bad.append(f"{where}: no file docs/{doc}")
                continue
            count += 1
            missing = [n for n in numbers(spec or "") if n not in headings(doc)]
            if missing:
                bad.append(f"{where}: docs/{doc} has no section {', '.join(missing)}")
    assert not bad, "\n".join(bad)
    assert count >= 30, f"expected the code to cite docs/ throughout, found {count} citations"


def test_sections_cited_inside_a_doc_exist_in_that_doc(files):
    bad = []
    for name, text in files.items():
        if os.path.dirname(name) != "docs" or not name.endswith(".md"):
            continue
        have = headings(os.path.basename(name))
        cited = [m.span() for m in CITATION.finditer(text)]  # numbers after a file name: not bare
        for m in BARE.finditer(text):
            if any(start <= m.start() < end for start, end in cited):
                continue
            missing = [n for n in numbers(m.group(1)) if n not in have]
            if missing:
                bad.append(
                    f"{name}:{line_of(text, m.start())}: {m.group(0)!r}: no section "
                    f"{', '.join(missing)} in this file"
                )
    assert not bad, "\n".join(bad)
