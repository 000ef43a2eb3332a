"""The documentation is tested: the site builds with warnings as errors, every Python snippet
runs, every documented command parses with its script's own argparse, every ``make`` target
named exists, and ``benchmarks/run_all.py`` writes its table between the page's markers.

Snippet conventions (in docs/*.md and README.md):

* the ```python blocks of a page run in order in one namespace, in a temporary working folder,
  with ``demo_root`` (the ``demo_root`` fixture: a small demo data root) defined;
* ``<!-- test-setup`` … ``-->`` (an HTML comment, invisible on the site) holds Python that runs
  at its place in the page, before the blocks after it: it makes the files and names a snippet
  takes for granted (a checkpoint, an image);
* ``<!-- skip: REASON -->`` on the line before a block leaves it out; the skips stay few
  (:data:`MAX_SKIPS`) and each gives its reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
MAX_SKIPS = 5
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!-- skip: (?P<reason>.+?) -->\s*$")
SETUP = re.compile(r"<!-- test-setup\n(?P<code>.*?)^-->", re.MULTILINE | re.DOTALL)
COMMAND = re.compile(r"^(\S*/)?(python3?|torchrun|make)\s")
SCRIPT_FOLDERS = ("recipes/", "benchmarks/")
OUR_MODULES = ("ssl_ptx", "external_data")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tables = _load(ROOT / "docs" / "recipes" / "argparse_tables.py", "docs_argparse_tables")
run_all = _load(ROOT / "benchmarks" / "run_all.py", "docs_run_all")


def _relative(page: Path) -> str:
    return str(page.relative_to(ROOT))


def python_steps(text: str) -> list[tuple[str, str, str | None]]:
    """``(kind, code, skip reason or None)`` in page order: kind "setup" for a test-setup
    comment, "block" for a ```python block."""
    steps = [(match.start(), "setup", match["code"], None) for match in SETUP.finditer(text)]
    for match in FENCE.finditer(text):
        if match["lang"] != "python":
            continue
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        steps.append((match.start(), "block", match["body"], skip["reason"] if skip else None))
    return [step[1:] for step in sorted(steps, key=lambda step: step[0])]


def shell_commands(text: str) -> list[list[str]]:
    """The command lines of the shell blocks (```bash, ```sh or unmarked) of a Markdown text,
    continuation lines joined, comments removed, as argument lists."""
    commands = []
    for match in FENCE.finditer(text):
        if match["lang"] not in ("", "bash", "sh", "shell", "console"):
            continue
        joined = match["body"].replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if COMMAND.match(line):  # not a file tree or an output listing
                commands.append(shlex.split(line))
    return commands


def script_invocation(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(script or module, its arguments)`` of a documented command that runs one of ours
    (``[.venv/bin/]python recipes/X.py …``, ``torchrun … benchmarks/X.py …``,
    ``python -m ssl_ptx…``); None for any other command. ``...`` stands for elided arguments
    and is dropped."""
    if not argv:
        return None
    program = Path(argv[0]).name
    rest = [a for a in argv[1:] if a != "..."]
    if program == "torchrun":  # its own options, then the script
        while rest and rest[0].startswith("-"):
            rest.pop(0)
        program = "python"
    if not program.startswith("python") or not rest:
        return None
    if rest[0] == "-m" and len(rest) > 1:
        module = rest[1]
        return (module, rest[2:]) if module.split(".")[0] in OUR_MODULES else None
    if rest[0].startswith(SCRIPT_FOLDERS) and rest[0].endswith(".py"):
        return rest[0], rest[1:]
    return None


def documented_invocations() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for argv in shell_commands(page.read_text()):
            invocation = script_invocation(argv)
            if invocation is not None:
                found.append((_relative(page), *invocation))
    return found


# ------------------------------------------------------------------------------ the site


def test_site_builds_strictly_with_every_recipe_option(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-5000:]}"
    recipe_page = (site / "recipes" / "train_supervised" / "index.html").read_text()
    for action in tables.capture_parser("recipes/train_supervised.py")._actions:
        for flag in set(action.option_strings) - {"-h", "--help"}:
            assert flag in recipe_page, f"{flag} missing from the generated options table"
    api_page = (site / "api" / "ema" / "index.html").read_text()
    assert "update_after_step" in api_page  # rendered from ModelEMA's docstring
    assert not list(site.rglob("*.py")), "Python files of docs/ were copied into the site"


def test_every_recipe_has_a_page_with_its_generated_options() -> None:
    for script in sorted((ROOT / "recipes").glob("*.py")):
        page = ROOT / "docs" / "recipes" / f"{script.stem}.md"
        assert page.is_file(), f"{script.name} has no page docs/recipes/{script.stem}.md"
        assert f"<!-- options: recipes/{script.name} -->" in page.read_text(), (
            f"{page.name} does not generate the options table of {script.name}"
        )


def test_options_table_lists_every_argument_with_its_default() -> None:
    parser = tables.capture_parser("recipes/predict.py")
    table = tables.options_table("recipes/predict.py")
    rows = table.splitlines()[2:]
    expected = [a for a in parser._actions if a.option_strings != ["-h", "--help"]]
    assert len(rows) == len(expected)
    for action, row in zip(expected, rows, strict=True):
        assert all(flag in row for flag in action.option_strings) or action.dest in row
    overlays = next(row for row in rows if "--overlays" in row)
    assert "`24`" in overlays


def test_capture_parser_runs_nothing_past_the_parser() -> None:
    parser = tables.capture_parser("benchmarks/run_all.py")
    assert parser.parse_args(["--only", "rle"]).only == ["rle"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--only", "no_such_benchmark"])


def test_images_are_small_and_used() -> None:
    text = "\n".join(page.read_text() for page in PAGES)
    for image in sorted((ROOT / "docs" / "img").glob("*")):
        assert image.stat().st_size < 300 * 1024, f"{image.name} is over 300 KB"
        assert f"img/{image.name}" in text, f"docs/img/{image.name} is on no page"


# ------------------------------------------------------------------------------ snippets


SNIPPET_PAGES = [page for page in PAGES if "```python" in page.read_text()]
RUNNABLE_PAGES = [
    page
    for page in SNIPPET_PAGES
    if any(kind == "block" and skip is None for kind, _, skip in python_steps(page.read_text()))
]


def test_skips_are_few_and_justified() -> None:
    skips = [
        (_relative(page), reason)
        for page in SNIPPET_PAGES
        for _, _, reason in python_steps(page.read_text())
        if reason is not None
    ]
    assert len(skips) <= MAX_SKIPS, f"too many skipped snippets: {skips}"
    assert all(len(reason.split()) >= 4 for _, reason in skips), skips


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=_relative)
def test_python_snippets_run(
    page: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__", "demo_root": demo_root}
    for number, (kind, code, skip) in enumerate(python_steps(page.read_text())):
        if skip is None:
            exec(compile(code, f"{_relative(page)} {kind} {number}", "exec"), namespace)


# ------------------------------------------------------------------------------ commands


INVOCATIONS = documented_invocations()


def test_documented_commands_are_found() -> None:
    scripts = {script for _, script, _ in INVOCATIONS}
    assert {"recipes/train_supervised.py", "recipes/predict.py", "external_data"} <= scripts
    assert script_invocation(shlex.split("torchrun --nproc_per_node=4 recipes/a.py --x 1")) == (
        "recipes/a.py",
        ["--x", "1"],
    )
    assert script_invocation(["python", "-m", "pip", "install", "x"]) is None


@pytest.mark.parametrize(
    ("page", "script", "argv"), INVOCATIONS, ids=[f"{p}:{s}" for p, s, _ in INVOCATIONS]
)
def test_documented_command_parses(page: str, script: str, argv: list[str]) -> None:
    parser = tables.capture_parser(script)
    try:
        parser.parse_args(argv)
    except SystemExit as stop:
        help_asked = {"-h", "--help"} & set(argv)
        assert help_asked and stop.code == 0, f"{page}: `{script} {shlex.join(argv)}` fails"


def test_make_targets_named_in_the_docs_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.MULTILINE))
    named = set()
    for page in PAGES:
        text = page.read_text()
        named |= set(re.findall(r"`make ([\w-]+)", text))  # inline code
        named |= {argv[1] for argv in shell_commands(text) if argv[:1] == ["make"] and argv[1:]}
    assert {"demo", "test"} <= named
    assert named <= targets, f"make targets named in the docs but missing: {named - targets}"


# ---------------------------------------------------------------------- run_all's table


def _fake_figures() -> list:
    return [
        run_all.Figure("rle", "decode", 0.1, "ms/row", "loop", 1.5),
        run_all.Figure("filter", "end to end", 40.0, "img/s", "model", 50.0, True),
        run_all.Figure("inference", "no TTA", 123.4, "img/s", higher_is_better=True),
    ]


def test_figure_ratio_favours_ssl_ptx_above_one() -> None:
    faster, slower, alone = _fake_figures()
    assert faster.ratio == pytest.approx(15.0)
    assert slower.ratio == pytest.approx(0.8)
    assert math.isnan(alone.ratio)
    assert json.loads(json.dumps(faster.as_dict()))["ratio"] == pytest.approx(15.0)


def test_markdown_table_rows() -> None:
    env = {"cpu": "Test CPU", "cpu_cores": 2, "torch_threads": 2, "torch": "2", "python": "3"}
    block = run_all.markdown_table(_fake_figures(), env, 90.0, ["a note"])
    lines = block.splitlines()
    assert "Test CPU CPU, 2 cores" in block and "1.5 minutes" in block
    assert "| rle | decode | 0.1 | ms/row | loop | 1.5 | 15.00× |" in lines
    assert "| filter | end to end | 40.0 | img/s | model | 50.0 | 0.80× |" in lines
    assert "| inference | no TTA | 123 | img/s |  |  |  |" in lines
    assert lines[-1] == "- a note"


def test_block_replaces_only_what_lies_between_the_markers() -> None:
    begin, end = run_all.BEGIN_MARKER, run_all.END_MARKER
    page = f"# Benchmarks\n\nintro\n\n{begin}\nold table\n{end}\n\n## RLE\nkept\n"
    updated = run_all.replace_between_markers(page, "new table\n")
    assert updated == f"# Benchmarks\n\nintro\n\n{begin}\nnew table\n{end}\n\n## RLE\nkept\n"
    assert run_all.replace_between_markers(updated, "new table\n") == updated


def test_block_is_appended_when_the_markers_are_missing() -> None:
    updated = run_all.replace_between_markers("# Benchmarks\n\nintro\n", "table")
    assert updated == (
        f"# Benchmarks\n\nintro\n\n{run_all.BEGIN_MARKER}\ntable\n{run_all.END_MARKER}\n"
    )


@pytest.mark.parametrize(
    "page",
    [f"{run_all.BEGIN_MARKER}\nno end", f"{run_all.END_MARKER}\nx\n{run_all.BEGIN_MARKER}"],
)
def test_broken_markers_are_refused(page: str) -> None:
    with pytest.raises(ValueError, match="broken"):
        run_all.replace_between_markers(page, "table")
