"""The docs are checked like code: README.md, docs/*.md, cluster/README.md (and tuning/*.md, if any).

- every `python -m raydino.X ...` they show names a module that exists, whose own argparse parser
  accepts the arguments, whose `--config` loads and validates, and whose tuning spec exists: found
  and checked by the repository's config linter, `tools/cluster_check.py` (`find_commands`,
  `check_commands`; no cluster files here, so no fit checks);
- every relative link points to a file that exists (and a `#heading` to a heading of that page);
- every repository path in inline code (`raydino/...`, `tests/...`, `tools/...`, ...) exists, and
  every dotted name (`raydino.eval.probes.probe_backbone`, `from raydino.x import y`) is a module
  of the package or a name defined at the top of that module (its home, not a re-export);
- README.md stays at most 300 lines, links every page of docs/, and its Layout section draws the
  package tree as it is on disk.

Fast and offline: no Ray is started and no process spawned (checking a `raydino.tune` command
imports Ray Tune's Python modules to reach the recipe's parser, nothing more).
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cluster_check as cc  # noqa: E402  (the repository's own config linter lives in tools/)

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "cluster/README.md", *sorted((ROOT / "tuning").glob("*.md"))]
EXAMPLES = sorted((ROOT / "docs/examples").glob("*.yaml"))  # config files the docs run, with their commands
MAX_README_LINES = 300

# Files one documented command writes and a later one reads (`--config`): they cannot exist while the
# suite runs, so for these only the arguments are checked.  Everything else a doc names must exist.
WRITTEN_BY_DOCS = {
    "runs/tune/smoke/best.yaml": "the best trial's config, written by `python -m raydino.tune tuning/smoke.yaml`",
}

# Commands the docs show *with the error they give*: they must keep failing, with these words (which
# the docs quote).
SHOWN_FAILING = {
    ("raydino.pretrain", ("--set", "augment.local_crop_scale=[0.6,0.3]", "--set", "model.arch=vit_tiny_patch16")): (
        "unknown timm backbone 'vit_tiny_patch16'",
        "min 0.6 is greater than max 0.3",
    ),
}

RECIPES = ("pretrain", "tune", "evaluate", "export", "analyze", "shard", "synth", "bench")


def _text(page: Path) -> str:
    return page.read_text()


def _without_code_blocks(text: str) -> str:
    """The page with fenced code blocks blanked (line numbers kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def checked() -> list[tuple[cc.Command, cc.Report]]:
    commands = cc.find_commands([*PAGES, *EXAMPLES])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # `--config FILE` and tuning specs are paths from the repository root, as the docs run them
        return [(cmd, cc.check_commands([cmd], [], ROOT)) for cmd in commands]


def test_the_docs_show_every_recipe(checked):
    shown = {cmd.module.removeprefix("raydino.") for cmd, _ in checked}
    assert set(RECIPES) <= shown
    in_readme = {cmd.module for cmd, _ in checked if Path(cmd.source) == README}
    assert {"raydino.shard", "raydino.tune", "raydino.pretrain", "raydino.evaluate", "raydino.export"} <= in_readme


def test_documented_commands_exist_parse_and_load_their_config(checked):
    problems = []
    for cmd, report in checked:
        if (cmd.module, tuple(cmd.args)) in SHOWN_FAILING:
            continue
        written = cmd.options.get("--config") in WRITTEN_BY_DOCS
        problems += [e for e in report.errors if not (written and "does not exist" in e)]
    assert not problems, "\n".join(problems)


def test_commands_shown_with_their_error_still_fail_that_way(checked):
    reports = {(cmd.module, tuple(cmd.args)): report for cmd, report in checked}
    docs = "\n".join(_text(p) for p in PAGES)
    for key, words in SHOWN_FAILING.items():
        assert key in reports, f"python -m {key[0]} {' '.join(key[1])} is no longer in the docs: drop it from SHOWN_FAILING"
        errors = "\n".join(reports[key].errors)
        for w in words:
            assert w in errors, f"python -m {key[0]} {' '.join(key[1])} no longer says {w!r}: {errors}"
            assert w in docs


def test_every_documented_command_has_a_parser_to_check_it_with(checked):
    notes = [note for _, report in checked for note in report.notes]
    assert not notes, "\n".join(notes)


# ---------------------------------------------------------------- links, paths, names

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# A file (with an extension) or a folder (with its trailing slash): `raydino/role` is a node label, not a path.
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:raydino|tests|tools|docs|cluster|tuning)/(?:[\w.-]+/)*(?:[\w-]+\.[A-Za-z]\w*)?)")
DOTTED = re.compile(r"(?<![\w./-])(raydino(?:\.[A-Za-z_]\w*)+)")
FROM_IMPORT = re.compile(r"^\s*from (raydino(?:\.\w+)*) import ([\w, ()]+)", re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _without_code_blocks(_text(page)).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: _rel(p))
def test_relative_links_point_to_files_that_exist(page):
    broken = []
    for target in LINK.findall(_without_code_blocks(_text(page))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not broken, "\n".join(broken)


def test_readme_is_short_and_links_every_page():
    text = _text(README)
    assert len(text.splitlines()) <= MAX_README_LINES
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(text)}
    missing = [_rel(p) for p in [*DOCS, ROOT / "cluster/README.md", ROOT / "tuning"] if p.resolve() not in linked]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: _rel(p))
def test_paths_named_in_the_docs_exist(page):
    spans = CODE_SPAN.findall(_without_code_blocks(_text(page)))
    missing = sorted({p for span in spans for p in REPO_PATH.findall(span) if not (ROOT / p).exists()})
    assert not missing, "\n".join(missing)


@cache
def _defined_names(module_file: Path) -> frozenset[str]:
    """Names a module defines at its top level (functions, classes, assignments), not those it imports."""
    names: set[str] = set()
    body = list(ast.parse(module_file.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try)):
            body += node.body + node.orelse + getattr(node, "finalbody", [])
    return frozenset(names)


def _resolve(dotted: str) -> str | None:
    """None when `raydino.a.b[.name]` is a module of the package or a name defined in it; else why not."""
    parts = dotted.split(".")
    path, i = ROOT / "raydino", 1
    while i < len(parts) and path.is_dir():
        if (path / parts[i] / "__init__.py").exists():
            path = path / parts[i]
        elif (path / f"{parts[i]}.py").exists():
            path = path / f"{parts[i]}.py"
        else:
            break
        i += 1
    if i == len(parts):
        return None
    module = path / "__init__.py" if path.is_dir() else path
    if parts[i] in _defined_names(module):
        return None  # deeper parts (a method, a field) are not checked
    return f"{dotted}: no module or name {parts[i]!r} in {_rel(module)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: _rel(p))
def test_module_and_names_in_the_docs_are_where_the_docs_say(page):
    text = _text(page)
    dotted = set(DOTTED.findall(text))
    for module, names in FROM_IMPORT.findall(text):
        dotted |= {f"{module}.{n.split()[0]}" for n in names.strip("()").split(",") if n.strip()}  # "x as y": x
    problems = sorted(filter(None, map(_resolve, dotted)))
    assert not problems, "\n".join(problems)


def test_the_readme_layout_draws_the_package_tree():
    text = _text(README)
    tree = text[text.index("## Layout") :].split("```")[1]
    drawn: dict[str, set[str]] = {}
    for line in tree.splitlines():
        m = re.match(r"  (\w+)/ +(.+)", line)  # "  core/   model loss ...   what it is"
        if m:
            drawn[m.group(1)] = set(re.split(r" {2,}", m.group(2))[0].split())
    packages = {p.parent.name for p in (ROOT / "raydino").glob("*/__init__.py")} - {"configs"}
    assert set(drawn) == packages
    for package, names in drawn.items():
        assert names == {p.stem for p in (ROOT / "raydino" / package).glob("*.py")} - {"__init__"}, package
    recipes = next(line for line in tree.splitlines() if "recipes" in line).split("recipes")[0].split()
    top = {p.stem for p in (ROOT / "raydino").glob("*.py")} - {"__init__", "config", "cli", "progress"}
    assert set(recipes) == top
