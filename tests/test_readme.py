"""The README stays true: its set-up commands, its command lines, its links and its headline claim.

- The two set-up commands at the top are the ones `.ci/run` reproduces (install then the test
  command) and the main job runs on its embedded default.
- Every `sandbox ...` line in a code block of the README or of docs/ names a command that exists
  and only options that command has (a renamed flag breaks a documented example; this catches it).
- Every relative link and image in the README and docs/ points to a file in the repository, and no
  document points outside it (a clone has nothing beside it).
- The headline command runs, and its labels are the counts the README states.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, ROOT / "ARCHITECTURE.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").rglob("*.md")])


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)


def _sandbox_lines(text: str) -> list[str]:
    """Each `sandbox ...` command in the code blocks (comments, pipes and `&&` chains cut off)."""
    out = []
    for block in _code_blocks(text):
        for line in block.splitlines():
            line = line.split(" #")[0].strip().lstrip("$ ").strip()
            for part in re.split(r"&&|\|", line):
                part = part.strip()
                if part.startswith("sandbox "):
                    out.append(part)
    return out


def _options() -> dict[str, set[str]]:
    from sandbox.app.cli import app

    cmd = typer.main.get_command(app)
    return {name: {o for p in sub.params for o in p.opts + p.secondary_opts if o.startswith("-")} | {"--help"}
            for name, sub in cmd.commands.items()}


def test_setup_commands_at_the_top():
    head = README.read_text().split("## ", 1)[0]
    blocks = _code_blocks(head)
    assert blocks, "the README's top has no code block with the set-up commands"
    cmds = [line for line in blocks[0].splitlines() if line and not line.startswith("#")]
    assert len(cmds) == 2, cmds
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[dev]'"
    assert cmds[0] == install + " && sandbox sweep --alignment 0..1"
    assert cmds[1] == install + " && python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and "\npython -m pytest" in ci


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_command_lines_use_existing_options(doc):
    options = _options()
    bad = []
    for line in _sandbox_lines(doc.read_text()):
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        if len(words) < 2 or words[1].startswith("-"):
            continue
        cmd = words[1]
        if cmd not in options:
            bad.append(f"{line!r}: no command {cmd!r}")
            continue
        for w in words[2:]:
            if w.startswith("--"):
                flag = w.split("=")[0]
                if flag not in options[cmd]:
                    bad.append(f"{line!r}: sandbox {cmd} has no option {flag}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text, f"{doc.name} points outside the repository (../shared)"
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists():
            bad.append(target)
        elif ROOT not in path.parents and path != ROOT:
            bad.append(f"{target} (outside the repository)")
    assert not bad, f"{doc.relative_to(ROOT)}: broken links {bad}"


def test_headline_command_runs_and_gives_the_stated_labels(tmp_path):
    """`sandbox sweep --alignment 0..1` (the README's main job), run as written into a fresh folder;
    the README's sentence "N ties, N inert, N no-room, no `beats`, no `degrades`" must be what it
    finds."""
    from sandbox.app.cli import main

    assert main(["sweep", "--alignment", "0..1", "--out", str(tmp_path / "map"), "--no-figures"]) == 0
    summary = pd.read_csv(tmp_path / "map" / "summary.csv")
    counts = summary["regime"].value_counts().to_dict()
    text = " ".join(README.read_text().split())
    m = re.search(r"(\d+) ties, (\d+) inert, (\d+) no-room, no `beats`, no `degrades`", text)
    assert m, "the README no longer states the default map's label counts"
    stated = {"ties": int(m.group(1)), "inert": int(m.group(2)), "no-room": int(m.group(3))}
    assert counts == stated, f"the default map gives {counts}, the README says {stated}"
