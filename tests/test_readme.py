"""Every code block of README.md runs, and the output it shows is the output it gives.

How README.md's fenced blocks are read (in order, in one temporary folder):

- ```` ```python ```` blocks run in one shared namespace, like the cells of a notebook. A block
  whose first line starts with ``>>>`` is a doctest: each shown output is compared with the repr
  or print the statement gives.
- ```` ```console ```` blocks run each ``$`` line: ``hookscope ...`` through
  ``hookscope.cli.main`` (exit status 2 when the block shows ``hookscope: error:``, else 0),
  anything else through bash. The lines after a command are its output (stderr, then stdout).
- A block that cannot run is preceded by ``<!-- not-run: reason -->``; a block that shows the
  output of a run made elsewhere by ``<!-- output-of: tests/FILE.py::TEST -->`` (that test
  compares it with ``matches_shown``). Any other block fails ``test_every_block_is_checked``.

Matching rules (``line_matches``): text must agree up to runs of whitespace; each number must
agree to one unit of the last decimal shown (``0.77`` accepts 0.76 to 0.78, ``0.5254`` accepts
0.5253 to 0.5255; integers exactly); in a line that shows a timing (``12.3 s``, ``25.18ex/s``,
``[00:00<00:00``) numbers are not compared. ``...`` inside a line stands for any text, and a line
that is only ``...`` for any number of lines.
"""

from __future__ import annotations

import doctest
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"<!--\s*(not-run|output-of):\s*(.+?)\s*-->")
_NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
_TIMING = re.compile(r"\d\s?s\b|\d(?:ex|it)/s|\[\d\d:\d\d")


@dataclass
class Block:
    """One fenced block of the README: its language tag, text, line number and marker."""

    lang: str
    code: str
    line: int
    marker: tuple[str, str] | None  # ("not-run" | "output-of", reason)

    @property
    def kind(self) -> str:
        if self.marker:
            return self.marker[0]
        if self.lang == "python":
            return "doctest" if self.code.lstrip().startswith(">>>") else "python"
        return "console" if self.lang == "console" else "unchecked"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, each with the marker comment just above it."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = _MARKER.fullmatch(above)
        code = "\n".join(lines[i + 1 : end])
        blocks.append(Block(fence.group(1), code, i + 1, marker.groups() if marker else None))
        i = end + 1
    return blocks


def line_matches(shown: str, actual: str) -> bool:
    """One shown output line against one actual line (the rules in the module docstring)."""
    pattern, numbers = "", []
    for part in re.split(rf"(\.\.\.|{_NUMBER}|\s+)", shown.strip()):
        if part == "...":
            pattern += ".*"
        elif part and re.fullmatch(_NUMBER, part):
            pattern += f"({_NUMBER})"
            numbers.append(part)
        elif part and part.isspace():
            pattern += r"\s+"
        else:
            pattern += re.escape(part)
    found = re.fullmatch(pattern, actual.strip())
    if found is None:
        return False
    if _TIMING.search(shown):
        return True
    return all(_numbers_agree(s, a) for s, a in zip(numbers, found.groups(), strict=True))


def _numbers_agree(shown: str, actual: str) -> bool:
    """Equal to one unit of the last decimal shown (integers: exactly)."""
    mantissa = shown.lower().split("e")[0]
    if "." not in mantissa and "e" not in shown.lower():
        return shown.lstrip("+") == actual.lstrip("+")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(shown.lower().split("e")[1]) if "e" in shown.lower() else 0
    unit = 10.0 ** (exponent - decimals)
    return abs(float(shown) - float(actual)) <= unit * 1.0001


def matches_shown(shown: list[str], actual: list[str]) -> bool:
    """Shown lines against actual lines in order; a line ``...`` stands for any lines."""
    if not shown:
        return not actual
    if shown[0].strip() == "...":
        return any(matches_shown(shown[1:], actual[i:]) for i in range(len(actual) + 1))
    return (
        bool(actual) and line_matches(shown[0], actual[0]) and matches_shown(shown[1:], actual[1:])
    )


def output_lines(text: str) -> list[str]:
    """Printed text as the terminal leaves it: the last ``\\r`` segment of each non-empty line."""
    lines = (line.split("\r")[-1].rstrip() for line in text.split("\n"))
    return [line for line in lines if line.strip()]


class _ReadmeChecker(doctest.OutputChecker):
    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return super().check_output(want, got, optionflags) or matches_shown(
            output_lines(want), output_lines(got)
        )


def _run_doctest(block: Block, namespace: dict) -> str:
    """Run a ``>>>`` block in ``namespace``; returns the failure report ('' when it passes)."""
    test = doctest.DocTestParser().get_doctest(
        block.code, namespace, f"README.md:{block.line}", str(README), block.line
    )
    report: list[str] = []
    runner = doctest.DocTestRunner(
        checker=_ReadmeChecker(), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    runner.run(test, out=report.append, clear_globs=False)
    namespace.update(test.globs)
    return "".join(report)


def _console_steps(code: str) -> list[tuple[str, list[str]]]:
    """``(command, shown output lines)`` for each ``$`` line of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps and line.strip():
            steps[-1][1].append(line)
    return steps


def _run_console(block: Block, capsys) -> str:
    """Run every command of a console block; returns the failures ('' when all match)."""
    from hookscope.cli import main

    failures = []
    for command, shown in _console_steps(block.code):
        if not command.startswith("hookscope "):
            subprocess.run(command, shell=True, check=True, executable="/bin/bash")
            continue
        capsys.readouterr()
        code = main(shlex.split(command)[1:])
        captured = capsys.readouterr()
        actual = output_lines(captured.err) + output_lines(captured.out)
        expected_code = 2 if any(s.startswith("hookscope: error:") for s in shown) else 0
        if code != expected_code or not matches_shown(shown, actual):
            failures.append(
                f"$ {command}\n(exit {code}, expected {expected_code})\nshown:\n"
                + "\n".join(shown)
                + "\ngot:\n"
                + "\n".join(actual)
            )
    return "\n".join(failures)


def test_every_block_is_checked():
    """Each block runs, or is marked as not run (with a reason) or as checked by a named test."""
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    unchecked = [
        f"README.md:{b.line} ({b.lang or 'no language'})" for b in blocks if b.kind == "unchecked"
    ]
    assert not unchecked, (
        f"mark these blocks <!-- not-run: reason --> or make them run: {unchecked}"
    )
    for block in blocks:
        if block.kind == "output-of":
            file, _, test = block.marker[1].partition("::")
            source = (README.parent / file).read_text(encoding="utf-8")
            assert f"def {test}(" in source, f"README.md:{block.line}: no {block.marker[1]}"
    assert sum(b.kind in ("python", "doctest", "console") for b in blocks) >= 8


@pytest.mark.parametrize(
    "shown, actual, agree",
    [
        ("p=0.77", "p=0.78", True),
        ("p=0.77", "p=0.7849", False),
        ("tensor([[0.5254, 0.1059]])", "tensor([[0.5255, 0.1058]])", True),
        ("tensor([[0.5254, 0.1059]])", "tensor([[0.5257, 0.1059]])", False),
        ("rank=3", "rank=4", False),
        ("[92, 113, 34]", "[92,  113, 34]", True),
        ("' Paris'  (p=0.77)", "' London'  (p=0.77)", False),
        ("420 sites (10.2 s)", "421 sites (3.1 s)", True),
        ("extract: 100% [00:00<00:00, 25.18ex/s]", "extract: 100% [00:01<00:00, 4.3ex/s]", True),
        ("cache ... 5 keys", "cache of 3 points, 5 keys", True),
        ("cache ... 5 keys", "cache of 3 points, 6 keys", False),
        ("1e-3", "0.0011", True),
    ],
)
def test_line_matching_rules(shown, actual, agree):
    assert line_matches(shown, actual) is agree


def test_ellipsis_lines_and_order():
    actual = ["header", "layer 28: 0.20", "layer 29: 0.77", "figure: x.png"]
    assert matches_shown(["...", "layer 29: 0.77", "figure: x.png"], actual)
    assert not matches_shown(["layer 29: 0.77", "..."], actual)
    assert not matches_shown(["...", "layer 29: 0.77"], actual)  # a line left over
    assert output_lines("a\rb\n\n c \n") == ["b", " c"]


@pytest.mark.real_model
def test_readme_code_blocks(tmp_path, monkeypatch, capsys):
    """Runs every python and console block of README.md on the real embedded model."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    failures = []
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        try:
            if block.kind == "python":
                exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
            elif block.kind == "doctest":
                failures.append(_run_doctest(block, namespace))
            elif block.kind == "console":
                failures.append(_run_console(block, capsys))
        except Exception as error:  # report every block, not only the first that fails
            failures.append(f"README.md:{block.line}: {type(error).__name__}: {error}")
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures)
