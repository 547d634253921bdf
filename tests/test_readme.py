"""The README and docs/ as promises that are checked: every ```python block of README.md
runs as written in a fresh interpreter, every ```bash command is checked offline
(installs name this project and its extras, app commands compose with Hydra, test
commands name what exists), every relative Markdown link and anchor resolves, and the
package cites only its own documentation.

A code block preceded by the line ``<!-- readme-test: slow -->`` (invisible on GitHub)
is a slow test (``-m "not slow"`` skips it)."""

from __future__ import annotations

import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_app import app_server

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SLOW_MARK = "<!-- readme-test: slow -->"
LANGUAGES = ("python", "bash", "text", "yaml")


# ------------------------------------------------------------------ code blocks
@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    slow: bool

    @property
    def where(self) -> str:
        return f"README.md line {self.line}"


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, language, start = opening.group(1), opening.group(2), i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(language, "\n".join(body) + "\n", start + 1, previous == SLOW_MARK))
        i += 1
    return blocks


BLOCKS = code_blocks(README.read_text(encoding="utf-8"))


def params(language: str) -> list:
    return [pytest.param(b, id=f"line{b.line}", marks=[pytest.mark.slow] if b.slow else [])
            for b in BLOCKS if b.language == language]


def test_every_block_has_a_checked_language():
    assert BLOCKS, "no code blocks found in README.md"
    for block in BLOCKS:
        assert block.language in LANGUAGES, (
            f"{block.where}: a ```{block.language or '(no language)'} block; use one of {LANGUAGES} "
            "(python, bash and yaml blocks are run or checked by tests/test_readme.py)")


@pytest.mark.parametrize("block", params("yaml"))
def test_yaml_blocks_are_recipes_that_load(block: Block):
    """A ```yaml block shows a compare recipe: it must parse and pass the recipe checks."""
    import yaml

    from lightning_imex.compare.recipe import parse_recipe

    recipe = parse_recipe("readme", yaml.safe_load(block.code), block.where)
    assert recipe.optimizers, f"{block.where}: a recipe without optimizers"


def test_text_blocks_are_output_not_commands():
    """``text`` is for output listings only: a command belongs in a bash block, where it is checked."""
    for block in (b for b in BLOCKS if b.language == "text"):
        for line in block.code.splitlines():
            words = line.strip().lstrip("$ ").split()
            assert not words or words[0] not in COMMAND_NAMES, (
                f"{block.where}: {line.strip()!r} is a command in a ```text block; make it a ```bash block")


# ------------------------------------------------------------------ bash commands
def commands(code: str, where: str) -> list[list[str]]:
    """A bash block as commands (argument lists): lines joined at a trailing backslash,
    comments dropped, split at ``&&``; any other shell operator is an error (unchecked)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in lexer:
            if token == "&&":
                out.append(command)
                command = []
            elif token and set(token) <= set("();<>|&"):
                pytest.fail(f"{where}: shell operator {token!r} in {line.strip()!r}: not checked offline "
                            "(a placeholder like <date> is a redirection in bash)")
            else:
                command.append(token)
        if command:
            out.append(command)
    return [c for c in out if c]


@functools.cache
def project() -> dict:
    if tomllib is not None:
        return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    from importlib.metadata import metadata  # the installed metadata of this checkout
    meta = metadata("lightning-imex")
    extras = {e: [] for e in meta.get_all("Provides-Extra") or []}
    return {"name": meta["Name"], "dependencies": meta.get_all("Requires-Dist") or [],
            "optional-dependencies": extras}


def check_pip(args: list[str], where: str) -> None:
    """``pip install``: the project from this checkout (``.``, ``-e .``, ``".[dev]"``) with
    extras it declares, or requirements the project depends on, at versions it allows."""
    assert args[:1] == ["install"], f"{where}: pip {' '.join(args)}: only 'pip install' is checked"
    meta = project()
    name = canonicalize_name(meta["name"])
    dependencies = {canonicalize_name(Requirement(d).name): Requirement(d) for d in meta["dependencies"]}
    for extra in meta["optional-dependencies"].values():
        dependencies.update({canonicalize_name(Requirement(d).name): Requirement(d) for d in extra})
    targets, rest = [], iter(args[1:])
    for arg in rest:
        if arg in ("-i", "--index-url", "--extra-index-url", "-f", "--find-links"):
            next(rest, None)  # where from, not what
        elif arg in ("-r", "--requirement", "-c", "--constraint"):
            pytest.fail(f"{where}: pip install {arg}: requirement files are not checked")
        elif not arg.startswith("-"):
            targets.append(arg)
    assert targets, f"{where}: pip install without a requirement"
    for target in targets:
        local = re.fullmatch(r"(\.{1,2}(?:/[^\[]*)?)(?:\[([\w,\s-]+)\])?", target)
        if local:  # a path: this repository (the README's commands run from its root)
            path, extras = (ROOT / local.group(1)).resolve(), local.group(2)
            assert (path / "pyproject.toml").is_file() and path == ROOT, (
                f"{where}: pip install {target}: not this project's root")
        else:
            requirement = Requirement(target)
            extras = ",".join(requirement.extras) or None
            key = canonicalize_name(requirement.name)
            if key == name:
                assert not requirement.specifier, f"{where}: pip install {target}: pins the project itself"
            else:
                assert key in dependencies, f"{where}: pip install {target}: not a dependency of {name}"
                for version in re.findall(r"==\s*([\w.+!-]+)", str(requirement.specifier)):
                    assert dependencies[key].specifier.contains(version, prereleases=True), (
                        f"{where}: pip install {target}: outside the project's {dependencies[key]}")
        for extra in (extras or "").split(","):
            assert not extra.strip() or extra.strip() in meta["optional-dependencies"], (
                f"{where}: pip install {target}: no extra {extra.strip()!r} in pyproject.toml "
                f"(extras: {', '.join(meta['optional-dependencies'])})")


@pytest.fixture(scope="module")
def compose_train():
    """Composes the app's ``train`` config with overrides, as ``lightning-imex-train`` does
    before it builds anything (unknown groups, options and keys fail here)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    importlib.import_module("lightning_imex.train")  # registers the config schema

    @functools.cache
    def run(overrides: tuple[str, ...]):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(config_module="lightning_imex.conf", version_base="1.3"):
                return compose("train", overrides=list(overrides))
        finally:
            GlobalHydra.instance().clear()

    return lambda overrides: run(tuple(overrides))


def sweep(overrides: list[str]) -> list[list[str]]:
    """Jobs of a multirun that together use every value of every sweep: the first values,
    then each other value in turn (not the whole product: each compose costs ~0.1 s)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    first = [values[0] for values in choices]
    return [first] + [first[:i] + [value] + first[i + 1:] for i, values in enumerate(choices) for value in values[1:]]


def check_train(args: list[str], where: str, compose_train) -> None:
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    flags = [a for a in overrides if a.startswith("-")]
    assert not flags, f"{where}: lightning-imex-train {' '.join(args)}: flag(s) {flags} not checked"
    for job in sweep(overrides) if multirun else [overrides]:
        try:
            compose_train(job)
        except Exception as error:  # noqa: BLE001 - the message is the point
            pytest.fail(f"{where}: lightning-imex-train {' '.join(args)} does not compose: "
                        f"{type(error).__name__}: {error}")


def check_pytest(args: list[str], where: str) -> None:
    """Not run (it is the suite): paths must exist, ``-m`` must name registered markers."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    markers = set(re.findall(r'"(\w+):', text.split("markers", 1)[1].split("]", 1)[0])) if "markers" in text else set()
    for i, arg in enumerate(args):
        if not arg.startswith("-") and (i == 0 or args[i - 1] not in ("-m", "-k")):
            assert (ROOT / arg.split("::")[0]).exists(), f"{where}: pytest {arg}: no such path"
        if i and args[i - 1] == "-m":
            names = set(re.findall(r"\w+", arg)) - {"not", "and", "or"}
            assert names <= markers, f"{where}: pytest -m {arg!r}: unknown marker(s) {names - markers}"


PYTHONS = ("python", "python3")
COMMAND_NAMES = {"lightning-imex-train", "lightning-imex-compare", "pip", "pip3", "pytest", "torchrun", "srun", "source", ".", *PYTHONS}


def check_command(command: list[str], where: str, compose_train) -> None:
    head, args = command[0], command[1:]
    if head in PYTHONS and args[:1] == ["-m"] and len(args) >= 2:
        module, rest = args[1], args[2:]
        if module == "venv":
            assert rest, f"{where}: python -m venv without a directory"
        elif module == "pip":
            check_pip(rest, where)
        elif module == "pytest":
            check_pytest(rest, where)
        elif module == "lightning_imex.train":
            check_train(rest, where, compose_train)
        else:
            pytest.fail(f"{where}: python -m {module}: not checked by tests/test_readme.py")
    elif head in PYTHONS and args and args[0].endswith(".py"):
        assert (ROOT / args[0]).is_file(), f"{where}: python {args[0]}: no such script"
    elif head in ("source", "."):
        assert args and args[0].endswith("/bin/activate"), f"{where}: {' '.join(command)}"
    elif head in ("pip", "pip3"):
        check_pip(args, where)
    elif head == "pytest":
        check_pytest(args, where)
    elif head == "lightning-imex-train":
        check_train(args, where, compose_train)
    elif head == "lightning-imex-compare":
        check_compare(args, where, compose_train)
    elif head == "torchrun" and "-m" in args:  # torchrun [options] -m lightning_imex.train overrides
        i = args.index("-m")
        assert args[i + 1] == "lightning_imex.train", f"{where}: torchrun -m {args[i + 1]}: not checked"
        check_train(args[i + 2:], where, compose_train)
    else:
        pytest.fail(f"{where}: {' '.join(command)!r}: not a command tests/test_readme.py knows how to check")


def check_compare(args: list[str], where: str, compose_train) -> None:
    """A recipe that loads, settings that parse, and overrides that compose with every
    optimizer's; ``--from``/``--list`` take no recipe."""
    from lightning_imex.compare import parse_settings
    from lightning_imex.compare.recipe import RecipeError, load_recipe

    if args[:1] in (["--list"], ["--from"]):
        assert args[0] == "--list" or len(args) > 1, f"{where}: --from without a folder"
        return
    try:
        recipe, overrides = parse_settings(load_recipe(args[0]), args[1:])
    except RecipeError as error:
        pytest.fail(f"{where}: lightning-imex-compare {' '.join(args)}: {error}")
    for entry in recipe.optimizers:
        try:
            compose_train((*recipe.overrides, *entry.overrides, *overrides))
        except Exception as error:
            pytest.fail(f"{where}: lightning-imex-compare {' '.join(args)} does not compose: {error}")


@pytest.mark.parametrize("block", params("bash"))
def test_bash_block_commands_check(block, compose_train):
    found = commands(block.code, block.where)
    assert found, f"{block.where}: an empty bash block"
    for command in found:
        check_command(command, block.where, compose_train)


def test_bash_checks_catch_mistakes(compose_train):
    """The checks above fail where they should (a check that cannot fail checks nothing)."""
    bad = [
        ["pip", "install", "-e", ".[nope]"],  # no such extra
        ["pip", "install", "torch==2.0.0"],  # below the project's torch>=2.6
        ["pip", "install", "requests"],  # not a dependency
        ["lightning-imex-train", "optimizer=nope"],  # no such option
        ["lightning-imex-train", "trainer.no_such_key=1"],  # no such key
        ["lightning-imex-train", "-m", "optimizer=adam,nope"],  # one job of the sweep is wrong
        ["lightning-imex-compare", "nope"],  # no such recipe
        ["lightning-imex-compare", "imex_spirals", "trainer.no_such_key=1"],
        ["python", "-m", "pytest", "tests/no_such_test.py"],
        ["make", "all"],  # an unknown command is not waved through
    ]
    for command in bad:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_command(command, "test", compose_train)
    with pytest.raises(pytest.fail.Exception):
        commands("lightning-imex-train ckpt_path=outputs/<date>/last.ckpt\n", "test")


# ------------------------------------------------------------------ links and references
def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup removed, lower case, punctuation dropped
    (letters, digits, ``-``, ``_`` and spaces stay), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = strip_code(path.read_text(encoding="utf-8"), spans=False)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    out |= set(re.findall(r'<a\s+(?:name|id)="([^"]+)"', text))
    return out


def strip_code(text: str, spans: bool = True) -> str:
    """The text without fenced blocks and (``spans``) code spans: links there are not links."""
    kept, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", line):
            fence = None
        elif fence is None:
            kept.append(line)
    text = "\n".join(kept)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text) if spans else text


def links(path: Path) -> list[str]:
    text = strip_code(path.read_text(encoding="utf-8"))
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    reference = re.findall(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, re.M)
    return [t for t in inline + reference if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # relative only


MARKDOWN = [README, *DOCS]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with anchor #{anchor} in {shown(resolved)})")
    return broken


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert links(path) or path != README, "README.md has no relative links: the parser is broken"
    assert broken_links(path) == [], f"{shown(path)}: broken links"


def test_link_check_catches_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# The `other` page: notes, 2.1\n\n## 2.1 Bias correction\n\n## Notes\n")
    page.write_text("[ok](other.md#the-other-page-notes-21) [ok](other.md#21-bias-correction) [ok](#top)\n"
                    "[ok](other.md#notes) [ok][ref]\n\n[ref]: other.md#notes\n"
                    "# Top\n[bad](missing.md) [bad](other.md#nope) `[code](missing.md)`\n"
                    "```\n[code](missing.md)\n```\n")
    assert broken_links(page) == ["missing.md (no such file)",
                                  f"other.md#nope (no heading with anchor #nope in {tmp_path / 'other.md'})"]
    assert github_slug("2. Adam as an ODE, and IMEX Runge-Kutta schemes") == \
        "2-adam-as-an-ode-and-imex-runge-kutta-schemes"
    assert github_slug("4. IMEX Adam's events (`tableau.py`, `plan.py`)") == "4-imex-adams-events-tableaupy-planpy"
    assert github_slug("Model EMA: `lightning_imex.callbacks.ModelEMA`") == \
        "model-ema-lightning_imexcallbacksmodelema"


FORBIDDEN = re.compile(r"\.\./shared|/work/shared|ALGORITHMS\.md")
SCANNED = [p for folder in ("lightning_imex", "conf", "benchmarks", "recipes")
           for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".yaml", ".yml", ".md")]


def test_only_the_projects_own_docs_are_cited():
    """The math lives in docs/algorithms.md, not in a folder outside the repository."""
    offenders = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
                 for p in [*SCANNED, *MARKDOWN]
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if FORBIDDEN.search(line)]
    assert offenders == []


def algorithm_sections() -> set[str]:
    """The numbered sections of docs/algorithms.md: "2" for "## 2. ...", "2.6" for "### 2.6 ..."."""
    text = strip_code((ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8"))
    return {m.rstrip(".") for m in re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)*\.?)\s", text, re.M)}


CITATION = re.compile(r"""
    docs/(?P<name>[\w.-]+\.md)               # docs/algorithms.md
    (?:\#[\w-]+)?\)?                          # a link's anchor and closing parenthesis
    (?:,?\s+sections?\s+                       # ", section 2" / " sections 1, 4 and 5" / "sections 4-5"
       (?P<numbers>(?:\d+(?:\.\d+)*(?:,\s*|\s+and\s+|-|\s*))+))?
""", re.VERBOSE)


def cited_docs(text: str) -> list[tuple[str, list[str]]]:
    """``docs/<name>.md`` paths in a text, each with the section numbers cited right after it
    ("docs/algorithms.md, section 2", "docs/algorithms.md sections 1, 4 and 5")."""
    return [(m["name"], re.findall(r"\d+(?:\.\d+)*", m["numbers"] or "")) for m in CITATION.finditer(text)]


def test_docs_paths_and_sections_cited_in_code_exist():
    """Every ``docs/<name>.md`` a docstring, comment or config names exists, and every
    "section N" cited with docs/algorithms.md is a numbered heading there."""
    sections = algorithm_sections()
    assert {"1", "2", "3", "4", "5", "6"} <= sections
    files = [*SCANNED, *(p for p in (ROOT / "tests").glob("*.py") if p != Path(__file__).resolve()), README]
    missing, cited = [], 0
    for path in files:
        for name, numbers in cited_docs(path.read_text(encoding="utf-8")):
            cited += 1
            if not (ROOT / "docs" / name).is_file():
                missing.append(f"{path.relative_to(ROOT)}: docs/{name}")
            elif name == "algorithms.md":
                missing += [f"{path.relative_to(ROOT)}: docs/algorithms.md section {n}" for n in numbers
                            if n not in sections]
    assert cited >= 8, "hardly any docs/ citations found: the pattern is broken"
    assert missing == []


def test_citation_check_catches_mistakes():
    assert cited_docs("(docs/algorithms.md, sections 1, 4 and 5)") == [("algorithms.md", ["1", "4", "5"])]
    assert cited_docs("see docs/optimizer-core.md") == [("optimizer-core.md", [])]
    assert cited_docs("(docs/algorithms.md,\nsection 6)") == [("algorithms.md", ["6"])]
    assert "99" not in algorithm_sections() and "2.6" in algorithm_sections()


# ------------------------------------------------------------------ python blocks
@pytest.mark.parametrize("block", params("python"))
def test_python_block_runs(block, tmp_path):
    """As a user runs it: ``python readme_block.py`` in an empty directory, the environment
    as it is; forked from a server that has imported torch and Lightning (``fork_runner``:
    the imports are most of a block's time), a new interpreter for a block that starts
    processes of its own (a ``strategy``: Lightning relaunches its command). (Starting the
    blocks in parallel was tried: on 2 cores their torch threads made the whole file 2x slower.)"""
    script = tmp_path / "readme_block.py"
    script.write_text(block.code, encoding="utf-8")
    if "strategy=" in block.code:
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    else:
        result = app_server().run(tmp_path, [], timeout=900, env=dict(os.environ), script=script)
    assert result.returncode == 0, (
        f"{block.where}: the python block exits with {result.returncode}\n{result.stdout[-2000:]}\n"
        f"{result.stderr[-4000:]}")
