"""The documentation stands on its own: nothing in the repository points to a file that is not in it, and every
`file:function` that docs/methods.md names exists (so the notes follow the code when it is renamed)."""
import ast
import io
import os
import re
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = os.path.join(ROOT, "docs/methods.md")
# Notes that live outside the repository (the patterns are written so that this file does not match them itself).
FORBIDDEN = re.compile(r"METHODS\.md|DESIGN\.md|\.\./shared|\bMETHODS[ ]§")
SECTIONS = ["## 1. One-shot steering vectors", "## 2. Transcoders", "## 3. Observable propagation"]
# A relative path into the repository (docs/..., tests/..., minisv/..., .ci/...), or the name of a Markdown file.
PATH = re.compile(r"(?<![\w.~/-])((?:docs|tests|minisv|\.ci)/[\w./-]*|[\w-]+\.md)\b")
# `minisv/steering.py:optimize_vector`, `obprop.py:report_html`, `minisv/circuits.py:Circuit.children`
REFERENCE = re.compile(r"`((?:minisv/)?\w+\.py):([\w.]+)`")
TEST_POINTER = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")
SECTION_POINTER = re.compile(re.escape("docs/methods.md") + r"`?,? §(\d+(?:\.\d+)*)")


def repo_files(*extensions):
    """Every file of the repository with one of these extensions (hidden folders and run outputs left out)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__", "node_modules")]
        for name in files:
            if name.endswith(extensions):
                yield os.path.join(folder, name)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose(path):
    """What a reader reads: a Markdown file whole; of a Python file its comments and the strings that contain a
    space (docstrings, messages, help texts), not one-word strings such as a file name a test writes."""
    text = read(path)
    if path.endswith(".md"):
        return text
    kinds = (tokenize.COMMENT, tokenize.STRING)
    return "\n".join(t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
                     if t.type in kinds and (t.type == tokenize.COMMENT or " " in t.string))


def test_nothing_points_outside_the_repository():
    problems = []
    for path in repo_files(".py", ".md"):
        where = os.path.relpath(path, ROOT)
        problems += [f"{where} mentions {bad}" for bad in sorted(set(FORBIDDEN.findall(read(path))))]
        for target in {m.rstrip(".") for m in PATH.findall(prose(path))}:
            here = os.path.join(os.path.dirname(path), target)
            if not os.path.exists(os.path.join(ROOT, target)) and not os.path.exists(here):
                problems.append(f"{where} points to {target}, which is not in the repository")
    assert not problems, "\n".join(problems)


def test_the_method_notes_exist_with_one_section_per_method():
    assert os.path.isfile(METHODS), "docs/methods.md is missing"
    headings = [line for line in read(METHODS).splitlines() if line.startswith("## ")]
    assert headings[:3] == SECTIONS


def definitions(path):
    """Names defined in a Python file: top-level functions and classes, and Class.method for their methods."""
    names = set()
    for node in ast.parse(read(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
    return names


def test_every_function_the_notes_name_exists():
    if not os.path.isfile(METHODS):
        pytest.fail("docs/methods.md is missing")
    refs = REFERENCE.findall(read(METHODS))
    assert len(refs) >= 40, "the notes should map each equation to the function implementing it"
    missing = [f"{file}:{name}" for file, name in refs
               if not os.path.isfile(os.path.join(ROOT, file)) or name not in definitions(os.path.join(ROOT, file))]
    assert not missing, "docs/methods.md names functions that do not exist: " + ", ".join(sorted(set(missing)))


def test_section_pointers_name_existing_sections():
    if not os.path.isfile(METHODS):
        pytest.fail("docs/methods.md is missing")
    numbers = {m[1] for line in read(METHODS).splitlines() if (m := re.match(r"#{2,4} (\d+(?:\.\d+)*)\.? ", line))}
    bad = [f"{os.path.relpath(path, ROOT)}: §{n}" for path in repo_files(".py", ".md")
           for n in SECTION_POINTER.findall(read(path)) if n not in numbers]
    assert not bad, "pointers to sections docs/methods.md does not have: " + ", ".join(bad)


def test_tests_named_in_the_docs_exist():
    """The reading guide's exercises name the tests that check them: those tests must exist."""
    named = [m for path in repo_files(".md") for m in TEST_POINTER.findall(read(path))]
    missing = [f"{file}::{name}" for file, name in named
               if not os.path.isfile(os.path.join(ROOT, file)) or name not in definitions(os.path.join(ROOT, file))]
    assert not missing, "the docs name tests that do not exist: " + ", ".join(missing)
