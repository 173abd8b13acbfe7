"""The audit commands as an operator runs them: a later process on SQLite and PostgreSQL.

`list` takes the times `datetime.isoformat()` prints and refuses a malformed cursor with a
usage error; `show --at N` and `diagram` still read a saga whose stream holds, after N,
an event no reader can decode (written by a later release, say).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent

from saga_es import SagaApplication
from saga_es.demo import CUSTOMERS, TRIP

DURABLE_STORES = ("sqlite", "postgres")
Env = dict[str, str]


def saga_es(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    """`saga-es ARGS` in its own process, on the store `env` names."""
    return subprocess.run(
        [sys.executable, "-m", "saga_es", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )


def listed(env: Env, *args: str) -> list[str]:
    done = saga_es(env, "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    return [row["key"] for row in json.loads(done.stdout)]


def append_ghost(app: SagaApplication, saga_id: UUID) -> int:
    """An event of a type no reader knows, after the saga's last one; its version."""
    version = app.get(saga_id).version + 1
    ghost = StoredEvent(saga_id, version, "shop:GhostEvent", b"{}")
    app.recorder.insert_events([ghost])
    return version


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_list_takes_iso_8601_times_with_fractions_and_offsets(
    env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app(env)
    for i in range(2):
        app.run(TRIP, CUSTOMERS[0], key=f"early-{i}")
    time.sleep(0.05)
    middle = datetime.now(UTC)
    time.sleep(0.05)
    app.run(TRIP, CUSTOMERS[1], key="late")

    assert listed(env, "--since", middle.isoformat()) == ["late"]
    assert listed(env, "--until", middle.isoformat()) == ["early-0", "early-1"]
    zulu = middle.isoformat().replace("+00:00", "Z")
    assert listed(env, "--since", zulu) == ["late"]
    elsewhere = middle.astimezone(timezone(timedelta(hours=2)))  # the same instant
    assert listed(env, "--until", elsewhere.isoformat()) == ["early-0", "early-1"]
    naive_utc = middle.replace(tzinfo=None).isoformat()  # no offset: UTC
    assert listed(env, "--since", naive_utc) == ["late"]
    assert listed(env, "--since", middle.date().isoformat()) == ["early-0", "early-1", "late"]

    bad = saga_es(env, "list", "--since", "yesterday")
    assert bad.returncode == 2
    assert "'yesterday' is not a date or a date and time in ISO 8601" in bad.stderr


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_list_refuses_a_malformed_cursor_and_says_when_nothing_matches(
    env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app(env)
    for i in range(3):
        app.run(TRIP, CUSTOMERS[0], key=f"k{i}")
    first = json.loads(saga_es(env, "list", "--json", "--limit", "1").stdout)[0]["id"]
    assert listed(env, "--after", first) == ["k1", "k2"]

    malformed = saga_es(env, "list", "--after", "not-a-saga-id")
    assert malformed.returncode == 2
    assert "Traceback" not in malformed.stderr
    assert "'not-a-saga-id' is not a saga id (a UUID)" in malformed.stderr

    nothing = saga_es(env, "list", "--name", "no-such-saga")
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout.strip() == "0 saga(s)"


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_show_at_n_reads_a_saga_whose_later_event_cannot_be_read(
    env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app(env)
    saga = app.run(TRIP, CUSTOMERS[0], key="ghosted")
    last = saga.version
    ghost = append_ghost(app, saga.id)

    table = saga_es(env, "show", str(saga.id), "--at", str(last))
    assert table.returncode == 0, table.stderr
    assert "SagaCompleted" in table.stdout
    assert "GhostEvent" not in table.stdout
    assert "'flight': 'FL-" in " ".join(table.stdout.split())  # the context as of N

    early = saga_es(env, "show", str(saga.id), "--at", "3", "--json")
    assert early.returncode == 0, early.stderr
    records = json.loads(early.stdout)
    assert [r["version"] for r in records] == [1, 2, 3]
    assert all(r["readable"] for r in records)

    whole = saga_es(env, "show", str(saga.id))  # the saga as it is now cannot be rebuilt
    assert whole.returncode == 1
    assert len(whole.stderr.strip().splitlines()) == 1
    assert f"version {ghost} (shop:GhostEvent) cannot be read" in whole.stderr
    assert "SagaCompleted" in whole.stdout  # the timeline up to it, for whoever debugs it
    assert "GhostEvent" not in whole.stdout
    beyond = saga_es(env, "show", str(saga.id), "--at", str(ghost))
    assert beyond.returncode == 1
    assert "cannot be read" in beyond.stderr


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_diagram_draws_the_readable_path_and_names_the_event_left_out(
    env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    app = open_app(env)
    saga = app.run(TRIP, CUSTOMERS[1], key="undone")  # the hotel is full: compensated
    ghost = append_ghost(app, saga.id)

    drawn = saga_es(env, "diagram", str(saga.id), "--definitions", "saga_es.demo")
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.startswith("flowchart LR")
    assert '"book_hotel<br/>failed: NoRoomsAvailable, 1 attempt"' in drawn.stdout
    assert '"book_flight<br/>compensated"' in drawn.stdout
    assert f"event {ghost} (shop:GhostEvent) cannot be read and is not drawn" in drawn.stderr

    unknown = saga_es(env, "diagram", str(saga.id))
    assert unknown.returncode == 1
    assert "no saga definition 'trip' version 1" in unknown.stderr
    assert "--definitions MODULE" in unknown.stderr


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_check_of_definitions_no_stored_saga_has_fails_naming_the_stored_ones(
    env: Env, open_app: Callable[[Env], SagaApplication], tmp_path: Path
) -> None:
    open_app(env).run(TRIP, CUSTOMERS[0], key="stored")
    (tmp_path / "typo_sagas.py").write_text(
        "from saga_es import SagaDefinition, Step\n"
        "TRIPP = SagaDefinition('tripp', [Step('book_flight', lambda c, k: None)])\n"
    )
    (tmp_path / "grown_sagas.py").write_text(
        "from saga_es.demo import TRIP\n"
        "from saga_es import SagaDefinition, Step\n"
        "REFUND = SagaDefinition('refund', [Step('pay_back', lambda c, k: None)])\n"
    )
    path = {"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}

    typo = saga_es({**env, **path}, "check", "--definitions", "typo_sagas")
    assert typo.returncode == 1
    assert "no stored saga was started from 'tripp'; stored names: 'trip'" in typo.stderr
    assert "Traceback" not in typo.stderr

    grown = saga_es({**env, **path}, "check", "--definitions", "grown_sagas")
    assert grown.returncode == 0, grown.stderr
    assert "check of 'refund': no stored saga of that name" in grown.stdout
    assert "1 saga(s) checked, 0 diverge (0 blocking)" in grown.stdout


def _authorise(context: dict[str, object], key: str) -> None:
    context["auth"] = "ok"


def _void(context: dict[str, object], key: str) -> None:
    context["auth"] = None


def _courier_down(context: dict[str, object], key: str) -> None:
    raise RuntimeError("courier down")


@pytest.mark.parametrize("store", DURABLE_STORES)
def test_show_prints_a_parent_then_its_child_saga_below_it(
    env: Env, open_app: Callable[[Env], SagaApplication]
) -> None:
    from saga_es import SagaDefinition, Step

    payment = SagaDefinition("payment", [Step("authorise", _authorise, _void)])
    order = SagaDefinition(
        "order", [Step.saga("payment", payment, context=dict), Step("ship", _courier_down)]
    )
    app = open_app(env)
    parent = app.run(order, {"amount": 30})
    child_id = SagaApplication.saga_id("payment", f"{parent.id}:payment")
    assert app.get(child_id).status == "compensated"
    other = app.run(payment, {"amount": 1}, key=f"{parent.id}:ship")  # a key, not a child

    shown = saga_es({**env, "COLUMNS": "200"}, "show", str(parent.id))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"└─ step 'payment' ran child saga {child_id}:" in out
    assert out.index(f"saga {parent.id}") < out.index(f"saga {child_id} · payment")
    child_table = out[out.index(f"saga {child_id} · payment") :]
    assert "SagaReverted" in child_table
    assert "authorise" in child_table
    assert str(other.id) not in out  # it took such a key but names no parent

    alone = saga_es({**env, "COLUMNS": "200"}, "show", str(child_id))
    assert alone.returncode == 0, alone.stderr
    assert "child of saga" in alone.stdout
    assert "ran child saga" not in alone.stdout  # a child has no children here
    started = json.loads(saga_es(env, "show", str(child_id), "--json").stdout)[0]
    assert started["details"]["parent_saga_id"] == str(parent.id)
    assert started["details"]["parent_step"] == "payment"
