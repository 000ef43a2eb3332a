"""Command-line options of the recipes and benchmarks, read from their own argparse parsers.

Used two ways, so that the documented options cannot drift from the code:

* as a mkdocs hook (``hooks:`` in ``mkdocs.yml``): every ``<!-- options: recipes/X.py -->``
  line of a page is replaced, at build time, by a table of every option of that script;
* by ``tests/test_docs.py``: every documented ``python recipes/X.py …`` command must parse.

A script's parser is captured by calling its ``parse_args(argv)`` (or ``main(argv)``) with
``ArgumentParser.parse_args`` patched to raise before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["capture_parser", "on_page_markdown", "options_table", "script_module"]

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- options: (?P<script>\S+) -->$", re.MULTILINE)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def script_module(target: str) -> ModuleType:
    """The module of ``recipes/X.py`` / ``benchmarks/X.py`` (a path relative to the repository)
    or of a dotted name run with ``python -m`` (``ssl_ptx.data.demo``, ``external_data``)."""
    if target.endswith(".py"):
        path = ROOT / target
        if not path.is_file():
            raise FileNotFoundError(f"no script {target} in {ROOT}")
        folder = str(path.parent)
        if folder not in sys.path:  # benchmarks import their siblings
            sys.path.insert(0, folder)
        name = "docs_" + re.sub(r"\W", "_", target[:-3])
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]
    module = importlib.import_module(target)
    if hasattr(module, "__path__"):  # a package run with -m: its __main__
        module = importlib.import_module(f"{target}.__main__")
    return module


def capture_parser(target: str) -> argparse.ArgumentParser:
    """The ``ArgumentParser`` that ``target``'s ``parse_args`` or ``main`` builds (nothing of
    the script runs past the parser).

    Raises:
        ValueError: the script has neither function, or never parses its arguments.
    """
    module = script_module(target)
    entry = getattr(module, "parse_args", None) or getattr(module, "main", None)
    if entry is None:
        raise ValueError(f"{target} has no parse_args(argv) or main(argv)")
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        entry([])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise ValueError(f"{target}: {entry.__name__}([]) returned without parsing arguments")


def _usage(action: argparse.Action) -> str:
    if not action.option_strings:
        metavar = action.metavar or action.dest
        return f"`{metavar}`" + (" …" if action.nargs in ("*", "+") else "")
    if action.nargs == 0:
        return ", ".join(f"`{flag}`" for flag in action.option_strings)
    metavar = action.metavar or action.dest.upper()
    if action.choices is not None and action.metavar is None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    shape = {"?": f"[{metavar}]", "*": f"[{metavar} …]", "+": f"{metavar} …"}
    if isinstance(metavar, tuple):  # one name per value, e.g. ("LOW", "HIGH")
        argument = " ".join(metavar)
    elif isinstance(action.nargs, int):
        argument = " ".join([metavar] * action.nargs)
    else:
        argument = shape.get(action.nargs, metavar)
    return ", ".join(f"`{flag} {argument}`" for flag in action.option_strings)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": "", "default": action.default}
    return " ".join(text.split()).replace("|", "\\|")


def options_table(target: str) -> str:
    """A Markdown table of every argument of ``target`` (see :func:`script_module`): the
    argument as typed, its default and its help."""
    parser = capture_parser(target)
    lines = ["| option | default | what it does |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        default = action.default
        shown = (
            ""
            if default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
            else f"`{' '.join(map(str, default)) if isinstance(default, list) else default}`"
        )
        lines.append(f"| {_usage(action)} | {shown} | {_help(action)} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """mkdocs hook: replace each ``<!-- options: SCRIPT -->`` line by its options table."""
    return MARKER.sub(lambda match: options_table(match["script"]), markdown)
