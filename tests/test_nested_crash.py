"""Nested sagas survive a SIGKILL at every boundary between parent and child.

A child process runs an `order` saga whose `pay` step runs a `payment` saga, and kills
itself (a real SIGKILL) at one chosen point; recovery in this process then brings parent
and child to consistent ends. Every call appends to a side-effect log, so the test sees
what ran, how often, and with which key.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DURABLE_STORES, Env

from saga_es import SagaApplication

SAGAS = """
import os
import signal
from pathlib import Path

from saga_es import SagaDefinition, Step

LOG = Path(os.environ["NESTED_LOG"])
KILL = os.environ.get("NESTED_KILL", "")
FAIL_SHIP = os.environ.get("NESTED_FAIL_SHIP") == "1"


def point(name):
    if name == KILL:
        os.kill(os.getpid(), signal.SIGKILL)


def step(name):
    def action(context, key):
        point(f"before {name}")
        with LOG.open("a") as log:
            log.write(f"do {name} {key}\\n")
        point(f"after {name}")
        if name == "ship" and FAIL_SHIP:
            raise RuntimeError("no courier")
        context[name] = True

    def undo(context, key):
        point(f"before undo {name}")
        with LOG.open("a") as log:
            log.write(f"undo {name} {key}\\n")
        point(f"after undo {name}")

    return Step(name, action, undo)


PAYMENT = SagaDefinition("payment", [step("authorise"), step("capture")])
ORDER = SagaDefinition("order", [step("reserve"), Step.saga("pay", PAYMENT), step("ship")])
"""

RUN = """
import os, sys
sys.path.insert(0, os.environ["NESTED_DIR"])
import nested_sagas
from saga_es import SagaApplication
store = ("PERSISTENCE", "SQLITE", "POSTGRES")
app = SagaApplication(env={k: v for k, v in os.environ.items() if k.startswith(store)})
app.run(nested_sagas.ORDER, {}, key="order-1")
"""

POINTS = [
    "before authorise",  # the parent's pay step is written ahead; the child has started
    "after capture",  # the child's last step ran; the child's completion is not recorded
    "before ship",  # the child completed; the parent's next step is written ahead
]
UNDO_POINTS = ["before undo capture", "after undo authorise", "before undo reserve"]


@pytest.fixture(params=DURABLE_STORES)
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def crash(env: Env, folder: Path, kill: str, fail_ship: bool) -> None:
    (folder / "nested_sagas.py").write_text(SAGAS)
    child = subprocess.run(
        [sys.executable, "-c", RUN],
        env={
            **os.environ,
            **env,
            "NESTED_DIR": str(folder),
            "NESTED_LOG": str(folder / "effects.log"),
            "NESTED_KILL": kill,
            "NESTED_FAIL_SHIP": "1" if fail_ship else "",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr


@pytest.mark.parametrize(
    ("kill", "fail_ship"),
    [*((p, False) for p in POINTS), *((p, True) for p in UNDO_POINTS)],
)
def test_parent_and_child_end_consistently_after_a_sigkill(
    env: Env,
    open_app: Callable[[Env], SagaApplication],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kill: str,
    fail_ship: bool,
) -> None:
    crash(env, tmp_path, kill, fail_ship)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NESTED_LOG", str(tmp_path / "effects.log"))
    monkeypatch.setenv("NESTED_FAIL_SHIP", "1" if fail_ship else "")
    import nested_sagas  # type: ignore[import-not-found]

    app = open_app({**env, "SAGA_STEP_TIMEOUT": "0"})
    app.register(nested_sagas.ORDER, nested_sagas.PAYMENT)
    for _ in range(3):  # a pass may leave the other saga to the next (it ended meanwhile)
        app.recover()
    parent_id = SagaApplication.saga_id("order", "order-1")
    child_id = SagaApplication.saga_id("payment", f"{parent_id}:pay")
    parent, child = app.get(parent_id), app.get(child_id)
    sys.modules.pop("nested_sagas", None)

    log = [line.split()[:2] for line in (tmp_path / "effects.log").read_text().splitlines()]
    if fail_ship:
        assert (parent.status, child.status) == ("compensated", "compensated")
        undone = [name for what, name in log if what == "undo"]  # a lost undo runs again
        assert list(dict.fromkeys(undone)) == ["capture", "authorise", "reserve"], log
    else:
        assert (parent.status, child.status) == ("completed", "completed")
        assert [name for what, name in log if what == "undo"] == []
    done = [name for what, name in log if what == "do"]
    assert done.count("authorise") == 1  # an effect recorded before the kill is not redone
    assert sum(n for (name, _), n in app.stats().items() if name == "payment") == 1
    assert app.verify() == []
