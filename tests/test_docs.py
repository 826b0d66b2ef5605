"""The repository stands alone: no file points outside it, and every docs/ page that code or docs cite exists."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_text_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if f.endswith((".py", ".md", ".sh", ".yaml", ".json", ".txt")) or f in ("Makefile", ".ci/run")]


def test_nothing_points_outside_the_repository_and_every_cited_doc_exists():
    outside, missing = [], []
    for f in _tracked_text_files():
        text = open(os.path.join(ROOT, f), encoding="utf-8", errors="replace").read()
        if re.search(r"\.\./shared|\bMETHOD\.md|\bOFFLINE\.md|\bDESIGN\.md|\bSTYLE\.md", text):
            outside.append(f)
        for doc in set(re.findall(r"\bdocs/[\w.-]+\.md", text)):
            if not os.path.exists(os.path.join(ROOT, doc)):
                missing.append(f"{f}: {doc}")
    assert outside == [], f"files that cite notes a clone does not have: {outside}"
    assert missing == []


def test_the_method_page_has_every_section_the_code_cites():
    page = open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8").read()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", page, re.M))
    cited = set()
    for f in _tracked_text_files():
        text = open(os.path.join(ROOT, f), encoding="utf-8", errors="replace").read()
        for refs in re.findall(r"docs/method\.md((?:,? ?§\d+(?:\.\d+)?)+)", text):
            cited |= set(re.findall(r"§(\d+(?:\.\d+)?)", refs))
    assert cited and cited <= headings, cited - headings
