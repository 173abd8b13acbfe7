import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from saga_es import SagaApplication
from saga_es.cli import cli


def _sqlite(db: Path) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(db)}


def test_demo_tells_the_trip_story_and_stores_both_sagas(tmp_path: Path) -> None:
    db = tmp_path / "trips.db"
    result = CliRunner().invoke(cli, ["demo", "--db", str(db)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Ada Lovelace: completed" in out
    assert "Blaise Pascal: compensated" in out
    # The hotel failed, then tickets and flight were cancelled, in that order.
    failed = out.index("NoRoomsAvailable")
    tickets = out.index("CompensationRan", failed)
    assert out.index("book_tickets", failed) < tickets
    assert out.index("book_flight", tickets) > tickets

    with SagaApplication(env=_sqlite(db)) as app:
        sagas = list(app.all_sagas())
    assert [s.status for s in sagas] == ["completed", "compensated"]
    assert sagas[1].compensated == ["book_tickets", "book_flight"]
    assert sagas[1].context.cancelled[0].startswith("tickets ")
    assert sagas[1].context.flight is None


def test_demo_defaults_to_saga_es_db_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["demo"], env={"PERSISTENCE_MODULE": None})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "saga_es.db").exists()


def test_list_and_show_read_back_the_file_in_a_later_process(tmp_path: Path) -> None:
    db = tmp_path / "trips.db"
    assert CliRunner().invoke(cli, ["demo", "--db", str(db)]).exit_code == 0

    def saga_es(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "saga_es", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )

    listed = saga_es("list", "--db", str(db), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)  # one JSON list
    assert [r["status"] for r in rows] == ["completed", "compensated"]
    assert [(r["step"], r["events"]) for r in rows] == [("book_hotel", 8), ("book_flight", 12)]

    def ids(*filters: str) -> list[str]:
        found = saga_es("list", "--db", str(db), "--json", *filters)
        assert found.returncode == 0, found.stderr
        return [row["id"] for row in json.loads(found.stdout)]

    first, second = (r["id"] for r in rows)
    assert ids("--status", "compensated") == [second]
    assert ids("--status", "completed", "--status", "compensated") == [first, second]
    assert ids("--name", "trip", "--limit", "1") == [first]
    assert ids("--limit", "1", "--after", first) == [second]
    assert ids("--name", "other") == []
    assert ids("--since", "2000-01-01", "--until", "2000-01-02") == []
    assert ids("--since", "2000-01-01") == [first, second]

    shown = saga_es("show", rows[1]["id"], "--db", str(db), "--json")
    assert shown.returncode == 0, shown.stderr
    tail = [(r["event"], r["step"]) for r in json.loads(shown.stdout)][-6:]
    assert tail == [
        ("StepFailed", "book_hotel"),
        ("CompensationStarted", "book_tickets"),
        ("CompensationRan", "book_tickets"),
        ("CompensationStarted", "book_flight"),
        ("CompensationRan", "book_flight"),
        ("SagaCompensated", None),
    ]
    records = json.loads(shown.stdout)
    positions = [r["position"] for r in records]
    assert positions == sorted(positions)
    assert records[0]["changes"]["customer"] == {
        "before": None,
        "after": "Blaise Pascal",
        "added": True,
    }
    assert records[-2]["changes"]["flight"]["after"] is None

    table = saga_es("show", rows[0]["id"], "--db", str(db))
    assert table.returncode == 0
    assert "SagaCompleted" in table.stdout
    assert "flight: None → 'FL-" in table.stdout

    at = saga_es("show", rows[0]["id"], "--db", str(db), "--at", "3", "--json")
    assert [r["event"] for r in json.loads(at.stdout)] == [
        "SagaStarted",
        "StepStarted",
        "StepCompleted",
    ]


def test_unknown_id_and_bad_version_are_one_line_errors(tmp_path: Path) -> None:
    db = tmp_path / "trips.db"
    runner = CliRunner()
    assert runner.invoke(cli, ["demo", "--db", str(db)]).exit_code == 0
    missing = runner.invoke(cli, ["show", "00000000-0000-0000-0000-000000000001", "--db", str(db)])
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines() == [
        "saga-es: no saga with id 00000000-0000-0000-0000-000000000001"
    ]
    with SagaApplication(env=_sqlite(db)) as app:
        saga_id = str(next(app.all_sagas()).id)
    beyond = runner.invoke(cli, ["show", saga_id, "--db", str(db), "--at", "99"])
    assert beyond.exit_code == 1
    assert "there is no version 99" in beyond.output
    assert "Traceback" not in beyond.output


def test_wrong_postgres_settings_print_one_line_naming_the_setting(tmp_path: Path) -> None:
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": "sagas",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": "1",
        "POSTGRES_USER": "saga",
        "POSTGRES_PASSWORD": "s3cret-pw",
        "POSTGRES_CONNECT_TIMEOUT": "2",
    }
    result = subprocess.run(
        [sys.executable, "-m", "saga_es", "list"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**_base_env(), **env},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("saga-es: POSTGRES_PORT: ")
    assert "s3cret-pw" not in result.stderr + result.stdout

    missing = {k: v for k, v in env.items() if k != "POSTGRES_DBNAME"}
    result = subprocess.run(
        [sys.executable, "-m", "saga_es", "list"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**_base_env(), **missing},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("saga-es: POSTGRES_DBNAME: ")
    assert "s3cret-pw" not in result.stderr


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PERSISTENCE"))}


def test_verify_and_recover_from_the_command_line(tmp_path: Path) -> None:
    from saga_es.demo import CUSTOMERS, TRIP

    db = tmp_path / "trips.db"
    runner = CliRunner()
    assert runner.invoke(cli, ["demo", "--db", str(db)]).exit_code == 0
    verified = runner.invoke(cli, ["verify", "--db", str(db)])
    assert verified.exit_code == 0, verified.output
    assert verified.output.strip().endswith("2 saga(s) checked, 0 rejected")

    # A worker died right after writing ahead the first booking: its outcome is unknown.
    with SagaApplication(env=_sqlite(db)) as app:
        saga = app._start(TRIP, CUSTOMERS[0], None)
        assert app._save_start(saga)
        interrupted = saga.id

    waiting = runner.invoke(cli, ["recover", "--db", str(db), "--definitions", "saga_es.demo"])
    assert waiting.exit_code == 0, waiting.output
    assert "0 resumed, 1 left to their worker" in waiting.output  # within the 60 s default

    missing = runner.invoke(cli, ["recover", "--db", str(db)], env={"SAGA_STEP_TIMEOUT": "0"})
    assert missing.exit_code == 1
    assert str(interrupted) in missing.output
    assert "no saga definition 'trip' version 1" in missing.output

    done = runner.invoke(
        cli,
        ["recover", "--db", str(db), "--definitions", "saga_es.demo:TRIP"],
        env={"SAGA_STEP_TIMEOUT": "0"},
    )
    assert done.exit_code == 0, done.output
    assert "1 resumed" in done.output
    with SagaApplication(env=_sqlite(db)) as app:
        saga = app.get(interrupted)
        assert saga.status == "completed"
        assert saga.attempts["book_flight"] == 2  # re-run, same idempotency key
        assert app.verify() == []

    bad = runner.invoke(cli, ["recover", "--db", str(db), "--definitions", "no.such.module"])
    assert bad.exit_code == 2
    assert "--definitions" in bad.output


REFUNDS = """
from collections.abc import Callable
from pathlib import Path

from saga_es import SagaDefinition, Step

FLAG = Path(__file__).with_name("refunds-work")


def charge(context, key):
    context["charged"] = True


def refund(context, key):
    if not FLAG.exists():
        raise ConnectionError("refund service down")
    context["charged"] = False


def ship(context, key):
    raise RuntimeError("no courier")


ORDER = SagaDefinition("order", [Step("charge", charge, refund), Step("ship", ship)])
"""


def test_resolve_finishes_a_stuck_saga_and_records_who_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "refunds.py").write_text(REFUNDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import refunds  # type: ignore[import-not-found]

    db = tmp_path / "orders.db"
    with SagaApplication(env=_sqlite(db)) as app:
        stuck = [app.run(refunds.ORDER, {}).id for _ in range(2)]
        assert [app.get(s).status for s in stuck] == ["stuck", "stuck"]
    runner = CliRunner()
    args = ["--db", str(db), "--definitions", "refunds", "--by", "ada", "--reason", "refund api"]

    again = runner.invoke(cli, ["resolve", str(stuck[0]), "--action", "retry", *args])
    assert again.exit_code == 1, again.output  # the refund failed again: still stuck
    assert "SagaResolved" in again.output
    assert "retry by ada: refund api" in again.output

    (tmp_path / "refunds-work").touch()
    retried = runner.invoke(cli, ["resolve", str(stuck[0]), "--action", "retry", *args])
    assert retried.exit_code == 0, retried.output
    marked = runner.invoke(cli, ["resolve", str(stuck[1]), "--action", "mark-compensated", *args])
    assert marked.exit_code == 0, marked.output

    with SagaApplication(env=_sqlite(db)) as app:
        first, second = (app.get(s) for s in stuck)
        assert (first.status, first.context_state) == ("compensated", {"charged": False})
        assert (second.status, second.context_state) == ("compensated", {"charged": True})
        resolved = [e for e in app.saga_events(second.id) if type(e).__name__ == "SagaResolved"]
        assert [(e.action, e.by, e.reason) for e in resolved] == [
            ("mark-compensated", "ada", "refund api")
        ]
        assert app.verify() == []

    not_stuck = runner.invoke(cli, ["resolve", str(stuck[1]), "--action", "retry", *args])
    assert not_stuck.exit_code == 1
    assert "is compensated; cannot resolve_saga" in not_stuck.output
    blank = ["--db", str(db), "--definitions", "refunds", "--by", " ", "--reason", "x"]
    empty_by = runner.invoke(cli, ["resolve", str(stuck[1]), "--action", "retry", *blank])
    assert empty_by.exit_code == 2
    assert "--by" in empty_by.output


def test_diagram_draws_a_sagas_path_its_definition_and_the_machine(tmp_path: Path) -> None:
    from saga_es.machine import TRANSITIONS

    db = tmp_path / "trips.db"
    runner = CliRunner()
    assert runner.invoke(cli, ["demo", "--db", str(db)]).exit_code == 0
    with SagaApplication(env=_sqlite(db)) as app:
        ok, undone = (row.saga_id for row in app.statuses())

    path = runner.invoke(
        cli, ["diagram", str(undone), "--db", str(db), "--definitions", "saga_es.demo"]
    )
    assert path.exit_code == 0, path.output
    assert path.output.startswith("flowchart LR")
    assert '"book_hotel<br/>failed: NoRoomsAvailable, 1 attempt"' in path.output
    assert '"book_flight<br/>compensated"' in path.output
    done = runner.invoke(
        cli, ["diagram", str(ok), "--db", str(db), "--definitions", "saga_es.demo"]
    )
    assert "compensated" not in done.output.split("classDef")[0]

    drawn = runner.invoke(cli, ["diagram", "--definitions", "saga_es.demo"])
    assert drawn.exit_code == 0, drawn.output
    assert all(f'"{s}' in drawn.output for s in ("book_flight", "book_tickets", "book_hotel"))

    machine = runner.invoke(cli, ["diagram", "--machine"])
    assert machine.output.startswith("stateDiagram-v2")
    drawn_moves = {
        (source, dest, trigger)
        for t in TRANSITIONS
        for source in (t["source"] if isinstance(t["source"], list) else [t["source"]])
        for dest, trigger in [(t["dest"], t["trigger"])]
    }
    assert machine.output.count(" : ") == len(drawn_moves)

    unknown = runner.invoke(cli, ["diagram", str(undone), "--db", str(db)])
    assert unknown.exit_code == 1
    assert "no saga definition 'trip' version 1" in unknown.output
    nothing = runner.invoke(cli, ["diagram"])
    assert nothing.exit_code == 2


def test_check_reports_what_new_code_cannot_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from saga_es.demo import CUSTOMERS, TRIP

    db = tmp_path / "trips.db"
    with SagaApplication(env=_sqlite(db)) as app:
        saga = app._start(TRIP, CUSTOMERS[0], None)  # its worker died in book_flight
        assert app._save_start(saga)
    (tmp_path / "renamed.py").write_text(
        "from saga_es import SagaDefinition, Step\n"
        "import saga_es.demo as demo\n"
        "old = {s.name: s for s in demo.TRIP.steps}\n"
        "TRIP2 = SagaDefinition('trip', [\n"
        "    Step('reserve_flight', old['book_flight'].action, old['book_flight'].compensation),\n"
        "    old['book_tickets'], old['book_hotel']])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()

    same = runner.invoke(cli, ["check", "--db", str(db), "--definitions", "saga_es.demo"])
    assert same.exit_code == 0, same.output
    assert "1 saga(s) checked, 0 diverge (0 blocking)" in same.output

    renamed = runner.invoke(cli, ["check", "--db", str(db), "--definitions", "renamed"])
    assert renamed.exit_code == 1, renamed.output
    assert f"saga {saga.id}" in renamed.output
    assert "renamed book_flight" in renamed.output
    assert "[blocking]" in renamed.output


def test_export_writes_json_and_a_self_contained_html_report(tmp_path: Path) -> None:
    db = tmp_path / "trips.db"
    runner = CliRunner()
    assert runner.invoke(cli, ["demo", "--db", str(db)]).exit_code == 0
    with SagaApplication(env=_sqlite(db)) as app:
        _, undone = (row.saga_id for row in app.statuses())
    args = [str(undone), "--db", str(db), "--definitions", "saga_es.demo"]

    printed = runner.invoke(cli, ["export", *args])
    assert printed.exit_code == 0, printed.output
    document = json.loads(printed.output)
    assert document["schema"] == "saga_es.export/1"
    assert document["saga"]["status"] == "compensated"
    assert [e["event"] for e in document["events"]][-1] == "SagaCompensated"
    assert document["diagram"].startswith("flowchart LR")

    report = tmp_path / "saga.html"
    written = runner.invoke(cli, ["export", *args, "--format", "html", "-o", str(report)])
    assert written.exit_code == 0, written.output
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert 'data-outcome="failed"' in html
    assert "http://" not in html.replace("http://www.w3.org", "")

    by_suffix = tmp_path / "by-suffix.html"
    assert runner.invoke(cli, ["export", *args, "-o", str(by_suffix)]).exit_code == 0
    assert by_suffix.read_text().startswith("<!DOCTYPE html>")
    flagged = runner.invoke(cli, ["export", *args, "--html"])
    assert flagged.output.startswith("<!DOCTYPE html>")
    as_json = runner.invoke(cli, ["export", *args, "--json", "-o", str(tmp_path / "x.html")])
    assert as_json.exit_code == 0
    assert json.loads((tmp_path / "x.html").read_text())["schema"] == "saga_es.export/1"

    missing = runner.invoke(
        cli, ["export", "00000000-0000-0000-0000-000000000001", "--db", str(db)]
    )
    assert missing.exit_code == 1
    assert "no saga with id" in missing.output


def test_stats_counts_per_definition_and_status(tmp_path: Path) -> None:
    db = tmp_path / "trips.db"
    runner = CliRunner()
    assert runner.invoke(cli, ["demo", "--db", str(db)]).exit_code == 0

    counted = runner.invoke(cli, ["stats", "--db", str(db), "--json"])
    assert counted.exit_code == 0, counted.output
    assert json.loads(counted.output) == [
        {"name": "trip", "status": "compensated", "count": 1},
        {"name": "trip", "status": "completed", "count": 1},
    ]
    only = runner.invoke(cli, ["stats", "--db", str(db), "--json", "--status", "completed"])
    assert json.loads(only.output) == [{"name": "trip", "status": "completed", "count": 1}]
    none = runner.invoke(cli, ["stats", "--db", str(db), "--json", "--name", "other"])
    assert json.loads(none.output) == []
    table = runner.invoke(cli, ["stats", "--db", str(db)])
    assert "2 saga(s)" in table.output
    bad = runner.invoke(cli, ["stats", "--db", str(db), "--status", "lost"])
    assert bad.exit_code == 2
    # The same filters as `list`, --key included.
    listed = runner.invoke(cli, ["list", "--db", str(db), "--json"])
    first = json.loads(listed.output)[0]
    for command in ("stats", "list"):
        keyed = runner.invoke(cli, [command, "--db", str(db), "--json", "--key", "nobody"])
        assert keyed.exit_code == 0, keyed.output
        assert json.loads(keyed.output) == []
    if first["key"] is not None:
        keyed = runner.invoke(cli, ["stats", "--db", str(db), "--json", "--key", first["key"]])
        assert json.loads(keyed.output) == [
            {"name": first["name"], "status": first["status"], "count": 1}
        ]


def test_list_refuses_a_malformed_cursor_with_a_message(tmp_path: Path) -> None:
    db = tmp_path / "trips.db"
    runner = CliRunner()
    assert runner.invoke(cli, ["demo", "--db", str(db)]).exit_code == 0
    bad = runner.invoke(cli, ["list", "--db", str(db), "--after", "not-an-id"])
    assert bad.exit_code == 2
    assert "--after" in bad.output
    assert "not-an-id" in bad.output
    assert bad.exception is None or isinstance(bad.exception, SystemExit)
    stranger = "00000000-0000-4000-8000-000000000000"
    unknown = runner.invoke(cli, ["list", "--db", str(db), "--after", stranger])
    assert unknown.exit_code == 1
    assert f"no saga with id {stranger}" in unknown.output
    assert unknown.exception is None or isinstance(unknown.exception, SystemExit)


SHOP_APP = """
from saga_es import SagaApplication, SagaDefinition, Step


class ShopSagas(SagaApplication):
    name = "ShopSagas"  # its tables: shopsagas_events, ...


ORDER = SagaDefinition("order", [Step("pay", lambda context, key: None)])
"""


def test_app_chooses_the_application_class_whose_tables_the_commands_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shop_app.py").write_text(SHOP_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    import shop_app  # type: ignore[import-not-found]

    db = tmp_path / "shop.db"
    with shop_app.ShopSagas(env=_sqlite(db)) as app:
        saga = app.run(shop_app.ORDER, {})
    runner = CliRunner()
    plain = runner.invoke(cli, ["list", "--db", str(db), "--json"])
    assert json.loads(plain.output) == []  # SagaApplication's own tables are empty
    chosen = runner.invoke(cli, ["--app", "shop_app:ShopSagas", "list", "--db", str(db), "--json"])
    assert [row["id"] for row in json.loads(chosen.output)] == [str(saga.id)]
    by_env = runner.invoke(
        cli, ["stats", "--db", str(db)], env={"SAGA_ES_APP": "shop_app:ShopSagas"}
    )
    assert "1 saga(s)" in by_env.output
    wrong = runner.invoke(cli, ["--app", "shop_app:ORDER", "list"])
    assert wrong.exit_code == 2
    assert "not a SagaApplication subclass" in wrong.output


def _saga_es(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`saga-es ARGS` in its own process, as a user runs it, on the store `env` names."""
    base = _base_env()
    path = os.pathsep.join(p for p in (str(cwd), base.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "saga_es", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env={**base, "PYTHONPATH": path, **env},
    )


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_export_to_a_file_that_cannot_be_written_is_one_line_naming_it(
    env: dict[str, str], open_app: Callable[[dict[str, str]], SagaApplication], tmp_path: Path
) -> None:
    from saga_es.demo import CUSTOMERS, TRIP

    saga = open_app(env).run(TRIP, CUSTOMERS[0])
    target = tmp_path / "no" / "such" / "folder" / "saga.json"
    done = _saga_es(env, "export", str(saga.id), "-o", str(target), cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("saga-es: ")
    assert str(target) in lines[0]
    assert not target.parent.exists()


BROKEN_MODULES = {
    "raises_at_import": "raise RuntimeError('no connection to the payment service')\n",
    "syntax_error": "def charge(:\n",
    "holds_a_number": "ORDER = 5\n",
}


@pytest.mark.parametrize(
    "spec",
    [
        "raises_at_import",
        "syntax_error",
        "holds_a_number:ORDER",
        ":ORDER",
        "..relative",
    ],
)
def test_definitions_and_app_that_cannot_be_loaded_are_usage_errors(
    spec: str, tmp_path: Path
) -> None:
    for name, text in BROKEN_MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    env = _sqlite(tmp_path / "sagas.db")
    for args in (
        ["recover", "--definitions", spec],
        ["diagram", "--definitions", spec],
        ["--app", spec if ":" in spec else f"{spec}:Sagas", "list"],
    ):
        done = _saga_es(env, *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        assert spec.split(":")[0] in done.stderr.splitlines()[-1], (args, done.stderr)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_command_without_the_definitions_it_needs_names_the_option(
    env: dict[str, str], open_app: Callable[[dict[str, str]], SagaApplication], tmp_path: Path
) -> None:
    from saga_es.demo import CUSTOMERS, TRIP

    app = open_app(env)
    saga = app.run(TRIP, CUSTOMERS[1])
    pending = app.submit(TRIP, CUSTOMERS[0])
    for args in (
        ["fork", str(saga.id), "--from-step", "book_hotel"],
        ["cancel", str(pending), "--by", "ada", "--reason", "test"],
        ["diagram", str(saga.id)],
    ):
        done = _saga_es(env, *args, cwd=tmp_path)
        if args[0] == "cancel":  # needs no definition: the next worker compensates
            assert done.returncode == 0, done.stderr
            continue
        assert done.returncode == 1, (args, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert "no saga definition 'trip' version 1" in line
        assert "--definitions MODULE" in line
    app.submit(TRIP, CUSTOMERS[1])
    done = _saga_es(env, "recover", cwd=tmp_path)
    assert done.returncode == 1
    assert "--definitions MODULE" in done.stdout
