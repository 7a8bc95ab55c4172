"""The manuals in docs/ cannot drift from the commands' `--help`, and the README stays short."""
import os
import re

import pytest

from umt_fast import config
from umt_fast.config import finetune as finetune_config, qa as config_qa, vl as config_vl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# command -> (its parser's module, its manual)
MANUALS = {
    "pretrain": (config, "docs/pretrain.md"),
    "pretrain_vl": (config_vl, "docs/pretrain_vl.md"),
    "finetune": (finetune_config, "docs/finetune.md"),
    "finetune_qa": (config_qa, "docs/qa.md"),
}
# written in --help's own text as the general form, not an option
PLACEHOLDERS = {"--section.field"}
# shorthands and plain options a manual may name besides the --section.field ones
ALIASES = {"--init", "--config", "--preset", "--run-dir", "--resume", "--help"}

_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*(?:[.-][a-z0-9_]+)*")
_FIELD_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*\.[a-z0-9_]+")


def _read(rel: str) -> str:
    return open(os.path.join(ROOT, rel), encoding="utf-8").read()


def _help(module) -> str:
    return module.help_text()


def _table_lines(text: str) -> list[str]:
    """The rows of the page's markdown tables (outside code blocks)."""
    rows, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.lstrip().startswith("|"):
            rows.append(line)
    return rows


@pytest.mark.parametrize("command", sorted(MANUALS))
def test_every_help_option_is_in_its_manual(command):
    module, page = MANUALS[command]
    text = _read(page)
    options = set(_FIELD_OPTION.findall(_help(module))) - PLACEHOLDERS
    assert options, f"no --section.field options found in {command}'s --help"
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w.])", text))
    assert not missing, f"{page} does not document these options of {command} --help: {missing}"


@pytest.mark.parametrize("command", sorted(MANUALS))
def test_every_option_in_a_manual_table_exists(command):
    module, page = MANUALS[command]
    known = set(_OPTION.findall(_help(module))) | ALIASES
    written = {o for row in _table_lines(_read(page)) for o in _OPTION.findall(row)}
    assert written, f"{page} has no option table"
    unknown = sorted(written - known)
    assert not unknown, f"{page} documents options that {command} --help does not have: {unknown}"


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    assert n <= 300, f"README.md has {n} lines; the per-command manuals belong in docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(text: str) -> set[str]:
    out, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.add(_slug(line.lstrip("#")))
    return out


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md"] + sorted(
    "docs/" + f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")))
def test_relative_links_resolve(page):
    text = _read(page)
    base = os.path.dirname(os.path.join(ROOT, page))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(file):
            broken.append(target)
        elif anchor and file.endswith(".md"):
            if anchor not in _anchors(open(file, encoding="utf-8").read()):
                broken.append(target)
    assert not broken, f"{page}: broken links {broken}"
