"""The documentation is tested like code, so it cannot drift from the package.

- `mkdocs build --strict` must pass.
- Every ```python block in README.md and docs/*.md runs, in order, one fresh namespace per
  page, in a temporary working directory. A block preceded by the line `<!-- skip -->` is not
  run (for examples that need a PostgreSQL server). A ```text block that directly follows a
  python block is that block's expected output, compared exactly.
- The Mermaid state diagram on the concepts page lists exactly the machine's transitions.
- The command-line page documents only commands and options that `saga-es` has.
- Every setting the persistence page names is one that `eventsourcing` reads.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import saga_es
from saga_es import SagaError, SagaEvent
from saga_es.machine import MACHINE, TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.glob("*.md")])
SKIP = "<!-- skip -->"

# Settings a developer or the test command may have exported; examples must not depend on them.
STORE_SETTINGS = re.compile(r"^(SAGAAPPLICATION_)?(PERSISTENCE_MODULE|SQLITE_|POSTGRES_)")

FENCE = re.compile(
    r"(?P<skip>^<!-- skip -->[ \t]*\n)?^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$"
    r"(?P<after>\n(?:[ \t]*\n)*)?",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    lang: str
    body: str
    line: int
    skip: bool
    start: int
    end: int


@dataclass(frozen=True)
class Example:
    """A python block, and the output it must print if a text block follows it."""

    code: str
    line: int
    expected: str | None


def blocks(text: str) -> list[Block]:
    return [
        Block(
            lang=m["lang"],
            body=m["body"],
            line=text.count("\n", 0, m.start("body")) + 1,
            skip=m["skip"] is not None,
            start=m.start(),
            end=m.end(),
        )
        for m in FENCE.finditer(text)
    ]


def examples(text: str) -> list[Example]:
    found = blocks(text)
    result = []
    for i, block in enumerate(found):
        if block.lang != "python" or block.skip:
            continue
        following = found[i + 1] if i + 1 < len(found) else None
        expected = None
        if following is not None and following.lang == "text" and following.start == block.end:
            expected = following.body
        result.append(Example(block.body, block.line, expected))
    return result


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# -- the site builds ------------------------------------------------------------------------


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "index.html").exists()
    concepts = (tmp_path / "concepts" / "index.html").read_text()
    assert '<pre class="mermaid"><code>stateDiagram-v2' in concepts


# -- the examples run -----------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if STORE_SETTINGS.match(n)]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    # A real, importable module, so that classes defined on the page (dataclass contexts)
    # resolve by topic when a saga is read back.
    module_name = "docs_example_" + re.sub(r"\W", "_", page.stem)
    module = types.ModuleType(module_name)
    monkeypatch.setitem(sys.modules, module_name, module)
    saved_environ = dict(os.environ)
    try:
        for example in examples(page.read_text()):
            out = io.StringIO()
            # Padding keeps tracebacks pointing at the page's own line numbers.
            code = compile("\n" * (example.line - 1) + example.code, str(page), "exec")
            with contextlib.redirect_stdout(out):
                exec(code, module.__dict__)
            if example.expected is not None:
                assert out.getvalue() == example.expected, f"{page_id(page)}:{example.line}"
    finally:  # a page may set os.environ (to show precedence); never let it leak
        os.environ.clear()
        os.environ.update(saved_environ)


def test_skip_is_rare() -> None:
    skipped = [
        (page_id(page), b.line)
        for page in PAGES
        for b in blocks(page.read_text())
        if b.skip and b.lang == "python"
    ]
    assert len(skipped) <= 2, skipped


def test_blocks_are_parsed() -> None:
    text = "\n".join(
        [
            "```python",
            "print(1)",
            "```",
            "",
            "```text",
            "1",
            "```",
            SKIP,
            "```python",
            "boom()",
            "```",
            "```python",
            "print(2)",
            "```",
            "prose",
            "```text",
            "not output",
            "```",
        ]
    )
    assert examples(text) == [Example("print(1)\n", 2, "1\n"), Example("print(2)\n", 13, None)]


# -- the drawing is the machine -------------------------------------------------------------

EDGE = re.compile(r"^\s*(\w+)\s*-->\s*(\w+)\s*:\s*(\w+)\s*$")


def mermaid_edges(text: str) -> set[tuple[str, str, str]]:
    diagrams = [b.body for b in blocks(text) if b.lang == "mermaid" and "stateDiagram" in b.body]
    assert len(diagrams) == 1, "docs/concepts.md should draw the state machine exactly once"
    edges = set()
    for line in diagrams[0].splitlines():
        if "[*]" in line:
            continue
        match = EDGE.match(line)
        if match:
            edges.add((match[1], match[2], match[3]))
    return edges


def machine_edges() -> set[tuple[str, str, str]]:
    edges = set()
    for trigger, event in MACHINE.events.items():
        for source, transitions in event.transitions.items():
            for transition in transitions:
                edges.add((source, transition.dest, trigger))
    return edges


def test_transitions_table_is_the_machine() -> None:
    declared = set()
    for t in TRANSITIONS:
        sources = t["source"] if isinstance(t["source"], list) else [t["source"]]
        declared |= {(s, t["dest"], t["trigger"]) for s in sources}
    assert declared == machine_edges()


def test_state_diagram_is_the_machine() -> None:
    drawn = mermaid_edges((DOCS / "concepts.md").read_text())
    assert drawn == machine_edges(), (
        f"missing from the drawing: {sorted(machine_edges() - drawn)}; "
        f"drawn but not in the machine: {sorted(drawn - machine_edges())}"
    )


def test_state_diagram_marks_start_and_ends() -> None:
    (diagram,) = [b.body for b in blocks((DOCS / "concepts.md").read_text()) if b.lang == "mermaid"]
    assert f"[*] --> {MACHINE.initial}" in diagram
    for state in saga_es.TERMINAL_STATES:
        assert f"{state} --> [*]" in diagram


# -- the concepts page names every event and error ------------------------------------------


def public(base: type) -> list[str]:
    return sorted(
        name
        for name in saga_es.__all__
        if isinstance(getattr(saga_es, name), type)
        and issubclass(getattr(saga_es, name), base)
        and getattr(saga_es, name) is not base
    )


@pytest.mark.parametrize("base", [SagaEvent, SagaError], ids=lambda b: b.__name__)
def test_concepts_names_every_public_class(base: type) -> None:
    text = (DOCS / "concepts.md").read_text()
    missing = [name for name in public(base) if f"`{name}`" not in text]
    assert not missing, f"docs/concepts.md does not mention {missing}"


def test_concepts_maps_every_trigger_to_its_event() -> None:
    text = " ".join((DOCS / "concepts.md").read_text().split())
    events = [getattr(saga_es, name) for name in public(SagaEvent)]
    assert {event.trigger for event in events} == set(MACHINE.events)
    missing = [e.__name__ for e in events if f"`{e.trigger}` → `{e.__name__}`" not in text]
    assert not missing, f"docs/concepts.md does not say which trigger records {missing}"


# -- the command-line page describes the real command ----------------------------------------

SECTION = re.compile(r"^## `saga-es (?P<command>[\w-]+)[^`]*`$", re.MULTILINE)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def test_cli_page_matches_the_command() -> None:
    from saga_es.cli import cli

    text = (DOCS / "cli.md").read_text()
    sections = list(SECTION.finditer(text))
    documented = [m["command"] for m in sections]
    assert sorted(documented) == sorted(cli.commands), "every command documented, no other"
    for i, match in enumerate(sections):
        end = sections[i + 1].start() if i + 1 < len(sections) else len(text)
        command = cli.commands[match["command"]]
        known = {opt for param in command.params for opt in param.opts}
        for option in set(OPTION.findall(text[match.end() : end])):
            # `--postgres-*` in prose names a family of options.
            assert any(
                k == option or (option.endswith("-") and k.startswith(option)) for k in known
            ), f"`saga-es {match['command']}` has no option {option}"


# -- the persistence page names real settings ------------------------------------------------

SETTING = re.compile(r"[`\"]([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)[`\"]")


def eventsourcing_settings() -> set[str]:
    from eventsourcing.application import Application
    from eventsourcing.persistence import InfrastructureFactory
    from eventsourcing.postgres import PostgresFactory
    from eventsourcing.sqlite import SQLiteFactory

    keys = {"CIPHER_KEY"}  # read by the cipher class named in CIPHER_TOPIC
    for cls in (Application, InfrastructureFactory, SQLiteFactory, PostgresFactory):
        # The factories name each setting as a constant: `SQLITE_DBNAME = "SQLITE_DBNAME"`.
        constants = [getattr(cls, name) for name in dir(cls) if name.isupper()]
        keys |= {value for value in constants if isinstance(value, str)}
    return keys


def test_persistence_page_names_real_settings() -> None:
    text = (DOCS / "persistence.md").read_text()
    named = {m.removeprefix("SAGAAPPLICATION_") for m in SETTING.findall(text)}
    assert "POSTGRES_SCHEMA" in named
    assert not named - eventsourcing_settings(), named - eventsourcing_settings()
