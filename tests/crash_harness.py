"""Crash harness: run sagas in child processes, SIGKILL them at chosen points, recover, check.

A child process builds its own `HarnessApp` (a `SagaApplication` whose `_save` marks two
kill points around each commit) and runs sagas whose actions and compensations mark kill
points too and append one line per call to a side-effect log (an `O_APPEND` file, each
line written with one `write` and `fsync`ed before the call returns). When the child
reaches the point it was told to die at, it appends a `kill` line (naming the call it
interrupts, if it dies inside one) and sends itself SIGKILL: nothing after that point
runs, nothing is flushed or closed. The points of a child's run are counted first by a
dry run of the same sagas in memory, so each child dies at a point it does reach, of
the kind (`CATEGORIES`) the campaign wants next.

Each log line of a call records the attempt the runner is running (read from the live
saga the runner drives, which the harness saw at its last save) and `durable`: the last
attempt whose `StepStarted` (or `CompensationStarted`) this process saw committed, i.e.
whose save had returned. `check_sagas` then holds the store and the log against each
other: a call whose attempt is not the durable one, or has no start in the store, or
shares its attempt with another call, ran without its own durable start.

Actions are idempotent by key, as saga_es asks: the step named by the context's
`fail_at` raises on every attempt and never takes effect; any other call takes effect
(its log line) and may run again after a crash. So "may have taken effect" is read from
the log, and a compensated saga must have undone each such step, after its last effect.

Nothing here changes saga_es: the kill points live in the subclass and the callables.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from saga_es import Saga, SagaApplication, SagaDefinition, Step
from saga_es.aggregate import replay, verify_events
from saga_es.errors import SagaNotFound
from saga_es.machine import COMPENSATED, COMPLETED
from saga_es.status import IN_FLIGHT_STATES

ACTION = "action"
COMPENSATION = "compensation"
KILL = "kill"

FORK = multiprocessing.get_context("fork")

CATEGORIES = (
    "before-commit",
    "after-commit",
    "between-compensations",
    "in-action",
    "in-compensation",
)
"""Where a crash child may die; `between-compensations` is right after the commit of one
compensation's `CompensationRan` with the next one's `CompensationStarted`."""


class StepRefused(Exception):
    """The ordinary failure of the step named by the context's `fail_at`."""


# -- the state of the harness in this process (a forked child starts from a reset) -----


@dataclass
class _Harness:
    log_path: str | None = None
    fd: int | None = None
    kill_at: int | None = None
    points: int = 0
    labels: list[str] | None = None
    live: dict[UUID, Saga] = field(default_factory=dict)
    durable: dict[tuple[str, str, str], int] = field(default_factory=dict)
    block: bool = False
    blocked: int = 0
    block_total: int = 0
    pause: float = 0.0
    fsync: bool = True


_H = _Harness()


def reset(
    *,
    log_path: str | Path | None = None,
    kill_at: int | None = None,
    labels: list[str] | None = None,
    block_total: int = 0,
    pause: float = 0.0,
) -> None:
    """Start this process's harness afresh (each child calls it first)."""
    global _H
    if _H.fd is not None:
        with contextlib.suppress(OSError):
            os.close(_H.fd)
    _H = _Harness(
        log_path=None if log_path is None else str(log_path),
        kill_at=kill_at,
        labels=labels,
        block=block_total > 0,
        block_total=block_total,
        pause=pause,
    )
    if log_path is not None:
        _H.fd = os.open(str(log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _log(record: dict[str, Any]) -> None:
    if _H.fd is None:
        return
    os.write(_H.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    if _H.fsync:
        os.fsync(_H.fd)


def _die(label: str, call: dict[str, Any] | None = None) -> None:
    """Log the kill (with the call it interrupts, if any, which took no effect) and die."""
    line = {"kind": KILL, "label": label, "point": _H.points, "pid": os.getpid(), "t": _now()}
    if call is not None:
        line["call"] = {**call, "effect": False, "t1": None}
    _log(line)
    os.kill(os.getpid(), signal.SIGKILL)


def _point(label: str, call: dict[str, Any] | None = None) -> None:
    """One place a crash may happen; the child dies here if this is its chosen point."""
    if _H.labels is not None:
        _H.labels.append(label)
    if _H.kill_at is not None and _H.points == _H.kill_at:
        _die(label, call)
    _H.points += 1


def _now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on this machine."""
    return time.monotonic()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a side-effect log, in the order they were written."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    # Another process may be appending right now: a line without its newline is not whole.
    lines = [json.loads(line) for line in text.split("\n")[:-1] if line]
    for n, line in enumerate(lines):
        line["n"] = n
    return lines


def calls_in(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every call the log shows: its own lines, and the calls interrupted by a kill."""
    calls = []
    for line in lines:
        if line["kind"] != KILL:
            calls.append(line)
        elif "call" in line:
            calls.append({**line["call"], "n": line["n"], "killed": True})
    return calls


class HarnessApp(SagaApplication):
    """A `SagaApplication` that may die right before or right after each commit.

    It also tells the callables which saga object the runner drives (`live`) and which
    attempts' starts are committed (`durable`), as seen by this process.
    """

    name = SagaApplication.name  # the same tables: on PostgreSQL they are named after it

    def _write(self, batch: Sequence[tuple[Saga, Sequence[Saga.Event]]]) -> None:
        """Every commit, sync or group commit, passes here: one batch of sagas' events."""
        for saga, _ in batch:
            _H.live[saga.id] = saga
        _point("before-commit")
        super()._write(batch)
        names = []
        for saga, events in batch:
            for event in events:
                names.append(type(event).__name__)
                if isinstance(event, Saga.StepStarted):
                    _H.durable[str(saga.id), event.step, ACTION] = event.attempt
                elif isinstance(event, Saga.CompensationStarted):
                    _H.durable[str(saga.id), event.step, COMPENSATION] = event.attempt
        between = "CompensationRan" in names and "CompensationStarted" in names
        _point("between-compensations" if between else "after-commit")


# -- the callables: every call is one line of the side-effect log ----------------------


def _enter(kind: str, step: str, context: dict[str, Any], key: str) -> dict[str, Any]:
    """What a call records; kill point `in-<kind>:before` (nothing took effect yet).

    A call killed here is logged in its kill line, so its start is checked too.
    """
    saga_id = key.split(":", 1)[0]
    saga = _H.live.get(UUID(saga_id))
    flying = None if saga is None else saga.in_flight if kind == ACTION else saga.compensating
    fails = kind == ACTION and context.get("fail_at") == step
    record = {
        "saga": saga_id,
        "step": step,
        "kind": kind,
        "attempt": None if flying is None else flying.get(step),
        "durable": _H.durable.get((saga_id, step, kind)),
        "effect": not fails,
        "pid": os.getpid(),
        "t0": _now(),
    }
    _point(f"in-{kind}:before", record)
    return record


def _leave(record: dict[str, Any], context: dict[str, Any]) -> Any:
    """The call takes effect (its log line); kill point `in-<kind>:after`."""
    record["t1"] = _now()
    _log(record)
    _point(f"in-{record['kind']}:after")
    step = record["step"]
    if not record["effect"]:
        raise StepRefused(f"{step} refused")
    context[step] = "done" if record["kind"] == ACTION else "undone"
    return f"{step}-ref" if record["kind"] == ACTION else None


def _blocks(record: dict[str, Any], context: dict[str, Any]) -> bool:
    return (
        _H.block
        and context.get("block") == record["step"]
        and context.get("block_kind", ACTION) == record["kind"]
    )


async def _block_forever(record: dict[str, Any], context: dict[str, Any]) -> None:
    """Seeding the racing test: this call never ends; the last one to block kills us.

    It blocks before its effect, or (`block_after`) right after it.
    """
    record["t1"] = None  # it runs until the process dies
    record["effect"] = bool(context.get("block_after")) and record["effect"]
    _log(record)
    _H.blocked += 1
    if _H.blocked == _H.block_total:
        _die("all-blocked")
    await asyncio.Event().wait()


def sync_call(kind: str, step: str) -> Callable[[dict[str, Any], str], Any]:
    """A plain action or compensation for `step`."""

    def call(context: dict[str, Any], key: str) -> Any:
        record = _enter(kind, step, context, key)
        if _H.pause:
            time.sleep(random.uniform(0.5, 1.5) * _H.pause)
        return _leave(record, context)

    call.__name__ = f"{kind}_{step}"
    return call


def async_call(kind: str, step: str) -> Callable[[dict[str, Any], str], Any]:
    """An async action or compensation for `step`; in seeding, it may block forever."""

    async def call(context: dict[str, Any], key: str) -> Any:
        record = _enter(kind, step, context, key)
        await asyncio.sleep(random.uniform(0.5, 1.5) * _H.pause if _H.pause else 0)
        if _blocks(record, context):
            await _block_forever(record, context)
        return _leave(record, context)

    call.__name__ = f"a{kind}_{step}"
    return call


def took_effect(kind: str, step: str) -> Callable[[dict[str, Any], str], bool]:
    """A reconcile function: did any call of `step` (`kind`) take effect in this saga?

    It looks where the effects are: the side-effect log.
    """

    def reconcile(context: dict[str, Any], key: str) -> bool:
        saga_id = key.split(":", 1)[0]
        assert _H.log_path is not None
        return any(
            line.get("saga") == saga_id
            and line["step"] == step
            and line["kind"] == kind
            and line["effect"]
            for line in read_log(_H.log_path)
        )

    reconcile.__name__ = f"reconcile_{kind}_{step}"
    return reconcile


def _step(
    name: str,
    *,
    action_async: bool = False,
    compensation: str | None = None,
    **policies: Any,
) -> Step:
    """`compensation`: None, "sync" or "async"."""
    action = (async_call if action_async else sync_call)(ACTION, name)
    undo = None
    if compensation is not None:
        undo = (async_call if compensation == "async" else sync_call)(COMPENSATION, name)
    return Step(name, action, undo, **policies)


DEFINITIONS: tuple[SagaDefinition, ...] = (
    SagaDefinition(
        "crash-three",
        [
            _step("reserve", compensation="sync"),
            _step("charge", action_async=True, compensation="async"),
            _step("ship", compensation="sync"),
        ],
    ),
    SagaDefinition(
        "crash-five",
        [
            _step("a", compensation="sync"),
            _step("b", action_async=True),  # no compensation
            _step("c", compensation="async", recovery="compensate"),
            _step("d", action_async=True, compensation="sync", reconcile=took_effect(ACTION, "d")),
            _step(
                "e",
                compensation="async",
                reconcile_compensation=took_effect(COMPENSATION, "e"),
            ),
        ],
    ),
    SagaDefinition(
        "crash-four",
        [
            _step("w", action_async=True, compensation="async", recovery="compensate"),
            _step("x"),  # no compensation
            _step(
                "y",
                action_async=True,
                compensation="sync",
                reconcile=took_effect(ACTION, "y"),
                reconcile_compensation=took_effect(COMPENSATION, "y"),
            ),
            _step("z", compensation="async"),
        ],
    ),
)
BY_NAME = {d.name: d for d in DEFINITIONS}

RACE = SagaDefinition(
    "race",
    [
        _step("p", action_async=True, compensation="async"),
        _step(
            "q",
            action_async=True,
            compensation="async",
            reconcile=took_effect(ACTION, "q"),
        ),
        _step("r", action_async=True, compensation="async", recovery="compensate"),
        _step("s"),  # sync, no compensation
    ],
)


# -- plans: what a child runs, decided by the parent from a seed -----------------------


@dataclass(frozen=True)
class Plan:
    """One saga a child runs: `driver` is "run", "arun" or "pending" (started, not run)."""

    name: str
    key: str
    fail_at: str | None
    driver: str

    @property
    def saga_id(self) -> UUID:
        """The saga's id (derived from its business key)."""
        return SagaApplication.saga_id(self.name, self.key)

    @property
    def context(self) -> dict[str, Any]:
        """The saga's initial context."""
        return {"key": self.key, "fail_at": self.fail_at}


def make_plans(rng: random.Random, prefix: str, count: int) -> list[Plan]:
    """`count` sagas: about half fail at a random step; sync, async and pending starts."""
    plans = []
    for i in range(count):
        definition = rng.choice(DEFINITIONS)
        fail_at = rng.choice(definition.step_names) if rng.random() < 0.5 else None
        driver = rng.choices(("run", "arun", "pending"), weights=(6, 3, 1))[0]
        plans.append(Plan(definition.name, f"{prefix}-{i}", fail_at, driver))
    return plans


def run_plans(app: SagaApplication, plans: Iterable[Plan]) -> None:
    """Run each plan to its end (or leave it pending), one after another."""
    for plan in plans:
        definition = BY_NAME[plan.name]
        if plan.driver == "run":
            app.run(definition, plan.context, key=plan.key)
        elif plan.driver == "arun":
            asyncio.run(app.arun(definition, plan.context, key=plan.key))
        else:
            saga = Saga.start(
                id=plan.saga_id,
                name=definition.name,
                definition_version=definition.version,
                steps=definition.step_names,
                compensable=definition.compensable,
                key=plan.key,
                context_type="builtins:dict",
                context=plan.context,
            )
            app._save(saga)


def dry_run(plans: Sequence[Plan]) -> list[str]:
    """The kill points a child running `plans` passes, in order (run in memory, no log)."""
    labels: list[str] = []
    reset(labels=labels)
    app = HarnessApp(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, definitions=DEFINITIONS)
    run_plans(app, plans)
    app.close()
    reset()
    return labels


def category(label: str) -> str:
    """`in-action:before` -> `in-action`."""
    return label.split(":", 1)[0]


def choose_kill_point(rng: random.Random, labels: Sequence[str], wanted: str) -> int:
    """A point of category `wanted` if the run passes one, else any point; uniformly."""
    points = [i for i, label in enumerate(labels) if category(label) == wanted]
    return rng.choice(points or range(len(labels)))


# -- child processes -------------------------------------------------------------------


def _crash_child(env: dict[str, str], plans: list[Plan], kill_at: int, log_path: str) -> None:
    reset(log_path=log_path, kill_at=kill_at)
    app = HarnessApp(env=env, definitions=DEFINITIONS)
    run_plans(app, plans)
    app.close()


def _recovery_child(
    env: dict[str, str],
    kill_at: int | None,
    log_path: str,
    result_path: str,
    definitions: Sequence[SagaDefinition] = DEFINITIONS,
) -> None:
    reset(log_path=log_path, kill_at=kill_at)
    app = HarnessApp(env=env, definitions=definitions, default_step_timeout=0)
    report = app.recover()
    Path(result_path).write_text(
        json.dumps(
            {
                "resumed": len(report.resumed),
                "waiting": [str(s) for s in report.waiting],
                "taken_over": [str(s) for s in report.taken_over],
                "failed": {str(k): v for k, v in report.failed.items()},
            }
        )
    )
    app.close()


def start(target: Callable[..., None], *args: Any) -> Any:
    """A forked child running `target(*args)`; it inherits no open connection of ours."""
    process = FORK.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def join(process: Any, timeout: float, what: str) -> int:
    """The child's exit code (negative: killed by that signal); it must end in time."""
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join(5)
        raise AssertionError(f"{what} did not end within {timeout} s")
    code: int = process.exitcode
    return code


# -- a campaign: rounds of crash, recover, check ---------------------------------------


@dataclass
class CampaignStats:
    """What a campaign did."""

    rounds: int = 0
    kills: int = 0
    recovery_kills: int = 0
    sagas: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    categories: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the test output."""
        return (
            f"{self.kills} kills ({self.recovery_kills} of them in recovery) in "
            f"{self.rounds} rounds, {self.sagas} sagas {dict(self.outcomes)}, "
            f"{self.seconds:.1f} s; kill points: {dict(sorted(self.categories.items()))}"
        )


def checker(env: dict[str, str]) -> SagaApplication:
    """An application that reads the store (it creates nothing)."""
    return SagaApplication(env={**env, "CREATE_TABLE": "no"}, definitions=DEFINITIONS)


def crash_campaign(
    env: dict[str, str],
    workdir: Path,
    *,
    kills: int,
    seed: int,
    children: int = 4,
    sagas_per_child: tuple[int, int] = (2, 4),
    recovery_kill_every: int = 4,
) -> CampaignStats:
    """Rounds until `kills` processes died; raises AssertionError naming the round's seed."""
    stats = CampaignStats()
    began = time.monotonic()
    schema = SagaApplication(env=env)  # create the schema once, before any child starts
    schema.close()
    env = {**env, "CREATE_TABLE": "no"}
    while stats.kills < kills:
        round_seed = seed * 1_000_003 + stats.rounds
        crash_round(env, workdir, round_seed, stats, children, sagas_per_child, recovery_kill_every)
        stats.rounds += 1
    app = checker(env)
    try:
        problems = app.verify()
        assert not problems, f"verify() after the campaign: {[str(p) for p in problems]}"
        flying = app.statuses(status=IN_FLIGHT_STATES, limit=10)
        assert not flying, f"still in flight after the campaign: {flying}"
        stuck = app.statuses(status="stuck", limit=10)
        assert not stuck, f"stuck after the campaign: {stuck}"
    finally:
        app.close()
    stats.seconds = time.monotonic() - began
    return stats


def crash_round(
    env: dict[str, str],
    workdir: Path,
    seed: int,
    stats: CampaignStats,
    children: int,
    sagas_per_child: tuple[int, int],
    recovery_kill_every: int,
) -> None:
    """Crash `children` children at chosen points, recover (maybe dying again), check."""
    rng = random.Random(seed)
    log_path = str(workdir / f"round-{seed}.log")
    where = f"round seed {seed} (log {log_path})"
    all_plans: list[Plan] = []
    processes = []
    for child in range(children):
        plans = make_plans(rng, f"{seed}-{child}", rng.randint(*sagas_per_child))
        labels = dry_run(plans)
        wanted = CATEGORIES[(stats.kills + child) % len(CATEGORIES)]
        kill_at = choose_kill_point(rng, labels, wanted)
        all_plans += plans
        processes.append(start(_crash_child, env, plans, kill_at, log_path))
    for process in processes:
        code = join(process, 60, f"crash child ({where})")
        assert code == -signal.SIGKILL, f"crash child exited with {code}, not SIGKILL ({where})"
        stats.kills += 1
    recovery_kill = (
        rng.randrange(0, 12)
        if stats.rounds % recovery_kill_every == recovery_kill_every - 1
        else None
    )
    for attempt in range(3):
        result_path = str(workdir / f"round-{seed}-recovery-{attempt}.json")
        process = start(_recovery_child, env, recovery_kill, log_path, result_path)
        code = join(process, 60, f"recovery child ({where})")
        if code == -signal.SIGKILL and recovery_kill is not None:
            stats.kills += 1
            stats.recovery_kills += 1
            recovery_kill = None  # the next recovery runs to its end
            continue
        assert code == 0, f"recovery child exited with {code} ({where})"
        result = json.loads(Path(result_path).read_text())
        os.unlink(result_path)
        assert not result["failed"], f"recovery failed sagas: {result['failed']} ({where})"
        assert not result["waiting"], f"recovery with timeout 0 waited: {result} ({where})"
        break
    lines = read_log(log_path)
    for line in lines:
        if line["kind"] == KILL:
            stats.categories[category(line["label"])] += 1
    app = checker(env)
    try:
        problems = check_sagas(app, [(p.saga_id, p.fail_at) for p in all_plans], lines)
        flying = app.statuses(status=IN_FLIGHT_STATES, limit=10)
        if flying:
            problems.append(f"in flight after recovery: {[str(r.saga_id) for r in flying]}")
        for plan in all_plans:
            with contextlib.suppress(SagaNotFound):
                stats.outcomes[app.get(plan.saga_id).status] += 1
                stats.sagas += 1
    finally:
        app.close()
    assert not problems, f"{where}:\n" + "\n".join(problems)
    os.unlink(log_path)


# -- the checks ------------------------------------------------------------------------


def check_sagas(
    app: SagaApplication,
    sagas: Iterable[tuple[UUID, str | None]],
    lines: Sequence[dict[str, Any]],
) -> list[str]:
    """Each saga `(id, fail_at)` ended as its events and the side-effect log say it must.

    Each call in the log ran on an attempt whose start it saw committed, and that the
    store has; no attempt ran twice. `lines` are `read_log`'s (numbered in log order).
    """
    mine: dict[str, list[dict[str, Any]]] = {}
    for call in calls_in(lines):
        mine.setdefault(call["saga"], []).append(call)
    problems = []
    checked = set()
    for saga_id, fail_at in sagas:
        checked.add(str(saga_id))
        try:
            events = app.saga_events(saga_id)
        except SagaNotFound:
            events = []
        calls = mine.get(str(saga_id), [])
        problems += check_calls(saga_id, events, calls)
        problems += check_saga(saga_id, events, fail_at, calls)
        if events:
            problems += check_status_row(app, saga_id, events)
    strays = sorted(set(mine) - checked)
    if strays:
        problems.append(f"calls ran for sagas nobody started: {strays}")
    return problems


def check_calls(
    saga_id: UUID, events: Sequence[Saga.Event], calls: Sequence[dict[str, Any]]
) -> list[str]:
    """No call ran without a durable start of its own attempt; no attempt ran twice."""
    problems = []
    starts = {
        (e.step, ACTION if isinstance(e, Saga.StepStarted) else COMPENSATION, e.attempt)
        for e in events
        if isinstance(e, Saga.StepStarted | Saga.CompensationStarted)
    }
    for line in calls:
        what = f"saga {saga_id}: {line['kind']} of {line['step']!r} (pid {line['pid']})"
        attempt = line["attempt"]
        if attempt is None:
            problems.append(f"{what} ran while the runner had no attempt of it in flight")
            continue
        if line["durable"] != attempt:
            problems.append(
                f"{what} ran attempt {attempt} while the last start its process had "
                f"committed was attempt {line['durable']}"
            )
        if (line["step"], line["kind"], attempt) not in starts:
            problems.append(f"{what} ran attempt {attempt}, which has no start in the store")
    counts = Counter((line["step"], line["kind"], line["attempt"]) for line in calls)
    for (step, kind, attempt), n in counts.items():
        if n > 1:
            problems.append(f"saga {saga_id}: {kind} of {step!r} attempt {attempt} ran {n} times")
    return problems


def check_status_row(
    app: SagaApplication, saga_id: UUID, events: Sequence[Saga.Event]
) -> list[str]:
    """The status projection agrees with the stream: the same status, at the same version."""
    key = events[0].key
    if key is None:
        return []  # found by key only: every saga of the harness has one
    rows = [row for row in app.statuses(key=key, limit=10) if row.saga_id == saga_id]
    last = events[-1]
    if [(r.status, r.version) for r in rows] != [(last.to_state, last.originator_version)]:
        return [
            f"saga {saga_id}: its status rows {rows} disagree with its last event "
            f"({last.to_state} at version {last.originator_version})"
        ]
    return []


def _collapse(seq: Iterable[str]) -> list[str]:
    """Consecutive repeats (re-runs of one interrupted call) counted once."""
    out: list[str] = []
    for item in seq:
        if not out or out[-1] != item:
            out.append(item)
    return out


def check_saga(
    saga_id: UUID,
    events: Sequence[Saga.Event],
    fail_at: str | None,
    calls: Sequence[dict[str, Any]],
) -> list[str]:
    """One saga is terminal, passes the verifier, and undid what it did, newest first."""
    if not events:
        if calls:
            return [f"saga {saga_id} is not stored, yet its callables ran: {calls}"]
        return []  # it died before its first commit: nothing ran
    saga = replay(None, events)
    assert saga is not None
    name = f"saga {saga_id} ({saga.name}, fail_at={fail_at})"
    problems = []
    problem = verify_events(events)
    if problem is not None:
        problems.append(f"{name}: the verifier refuses it: {problem}")
    if saga.status not in (COMPLETED, COMPENSATED):
        return [*problems, f"{name} is {saga.status}, not terminal"]
    effects = [line for line in calls if line["kind"] == ACTION and line["effect"]]
    undos = [line for line in calls if line["kind"] == COMPENSATION and line["effect"]]
    took_effect = {line["step"] for line in effects}
    compensated = [e.step for e in events if isinstance(e, Saga.CompensationRan)]
    by_policy = [  # an interrupted step whose recovery is "compensate"
        e.step for e in events if isinstance(e, Saga.StepFailed) and e.compensate
    ]
    expected = COMPENSATED if fail_at is not None or by_policy else COMPLETED
    if saga.status != expected:
        problems.append(f"{name} is {saga.status}, expected {expected}")
    if saga.status == COMPLETED:
        if saga.completed != saga.steps:
            problems.append(f"{name} completed with steps {saga.completed} of {saga.steps}")
        undone = [line["step"] for line in calls if line["kind"] == COMPENSATION]
        if compensated or undone or saga.compensated:
            problems.append(f"{name} completed, yet compensations ran: {compensated or undone}")
        missing = [s for s in saga.steps if s not in took_effect]
        if missing:
            problems.append(f"{name} completed, yet no action of {missing} took effect")
        return problems
    # compensated: every step that may have taken effect is undone, newest first
    done_order = [
        e.step
        for e in events
        if isinstance(e, Saga.StepCompleted) or (isinstance(e, Saga.StepFailed) and e.compensate)
    ]
    due = [s for s in reversed(done_order) if s in saga.compensable]
    if compensated != due:
        problems.append(
            f"{name}: compensations ran in the order {compensated}; "
            f"reverse order of completion is {due}"
        )
    not_undone = sorted(s for s in took_effect if s in saga.compensable and s not in compensated)
    if not_undone:
        problems.append(f"{name}: the actions of {not_undone} took effect and were not undone")
    if _collapse(line["step"] for line in undos) != due:
        problems.append(
            f"{name}: the compensation calls were {[line['step'] for line in undos]}, "
            f"expected {due} (each maybe repeated)"
        )
    for step in took_effect & set(compensated):
        last_do = max(line["n"] for line in effects if line["step"] == step)
        if max((line["n"] for line in undos if line["step"] == step), default=-1) < last_do:
            problems.append(f"{name}: {step!r} took effect again after its compensation ran")
    if fail_at is not None and not by_policy:
        failed = [e for e in events if isinstance(e, Saga.StepFailed)]
        if not failed or failed[-1].step != fail_at or failed[-1].error_type != "StepRefused":
            problems.append(f"{name}: the failure recorded is {failed}, not {fail_at!r}'s")
    return problems


# -- racing workers --------------------------------------------------------------------


@dataclass(frozen=True)
class RacePlan:
    """One saga of the racing test: pending, or interrupted by a crash in the call named."""

    key: str
    fail_at: str | None
    block: str | None = None
    block_kind: str = ACTION
    block_after: bool = False

    @property
    def saga_id(self) -> UUID:
        """The saga's id (derived from its business key)."""
        return SagaApplication.saga_id(RACE.name, self.key)

    @property
    def context(self) -> dict[str, Any]:
        """The saga's initial context."""
        return {
            "key": self.key,
            "fail_at": self.fail_at,
            "block": self.block,
            "block_kind": self.block_kind,
            "block_after": self.block_after,
        }


def race_plans(rng: random.Random, pending: int, crashed: int) -> list[RacePlan]:
    """`pending` sagas never started, and `crashed` ones that a crash left mid-call.

    A crashed saga dies in an action (of "p", "q" or "r") or, failing at "s", in a
    compensation (of "r", "q" or "p"), before or after that call took effect.
    """
    plans = []
    for i in range(pending):
        fail_at = rng.choice(RACE.step_names) if rng.random() < 0.3 else None
        plans.append(RacePlan(f"pending-{i}", fail_at))
    for i in range(crashed):
        after = rng.random() < 0.5
        if rng.random() < 0.6:
            block = rng.choice(("p", "q", "r"))
            fail_at = rng.choice((None, "s"))
            plans.append(RacePlan(f"crashed-{i}", fail_at, block, ACTION, after))
        else:
            block = rng.choice(("p", "q", "r"))
            plans.append(RacePlan(f"crashed-{i}", "s", block, COMPENSATION, after))
    return plans


def _seed_child(env: dict[str, str], plans: list[RacePlan], log_path: str) -> None:
    """Save the pending sagas; run the others together until each blocks in its call.

    The last call to block kills this process: every crashed saga is left with one
    call started (durably) and without an outcome, as a crash leaves it.
    """
    crashed = [p for p in plans if p.block is not None]
    reset(log_path=log_path, block_total=len(crashed))
    app = HarnessApp(env=env, definitions=[RACE])
    pending = [p for p in plans if p.block is None]
    for i in range(0, len(pending), 100):
        app.save(
            *(
                Saga.start(
                    id=p.saga_id,
                    name=RACE.name,
                    definition_version=RACE.version,
                    steps=RACE.step_names,
                    compensable=RACE.compensable,
                    key=p.key,
                    context_type="builtins:dict",
                    context=p.context,
                )
                for p in pending[i : i + 100]
            )
        )

    async def crash_them() -> None:
        await asyncio.gather(*(app.arun(RACE, p.context, key=p.key) for p in crashed))

    asyncio.run(crash_them())
    raise AssertionError("every crashed saga ran to its end: none blocked")


def _race_worker(
    env: dict[str, str],
    log_path: str,
    result_path: str,
    timeout: float,
    pause: float,
    barrier: Any,
    deadline: float,
) -> None:
    """Loop `recover()` until no saga is in flight; write what this worker did."""
    reset(log_path=log_path, pause=pause)
    app = HarnessApp(env=env, definitions=[RACE], default_step_timeout=timeout)
    barrier.wait(30)
    totals: Counter[str] = Counter()
    failed: dict[str, str] = {}
    began = time.monotonic()
    while True:
        report = app.recover()
        totals["passes"] += 1
        totals["resumed"] += len(report.resumed)
        totals["taken_over"] += len(report.taken_over)
        totals["waiting"] += len(report.waiting)
        failed.update({str(k): v for k, v in report.failed.items()})
        if not app.statuses(status=IN_FLIGHT_STATES, limit=1):
            break
        if time.monotonic() - began > deadline:
            totals["gave_up"] = 1
            break
        if not report.resumed:
            time.sleep(0.02)
    seconds = round(time.monotonic() - began, 2)
    result = {"pid": os.getpid(), **totals, "seconds": seconds, "failed": failed}
    Path(result_path).write_text(json.dumps(result))
    app.close()


def check_overlaps(lines: Sequence[dict[str, Any]], died_at: dict[int, float]) -> list[str]:
    """No two calls of one step (or of its compensation) ran at the same time.

    A call still running when its process was killed ran until that kill.
    """
    problems = []
    runs: dict[tuple[str, str, str], list[tuple[float, float, dict[str, Any]]]] = {}
    for line in calls_in(lines):
        end = line["t1"] if line["t1"] is not None else died_at.get(line["pid"], float("inf"))
        runs.setdefault((line["saga"], line["step"], line["kind"]), []).append(
            (line["t0"], end, line)
        )
    for (saga_id, step, kind), calls in runs.items():
        calls.sort(key=lambda c: c[0])
        for (_, end, before), (start_, _, after) in itertools.pairwise(calls):
            if start_ < end:
                problems.append(
                    f"saga {saga_id}: {kind} of {step!r} attempt {after['attempt']} "
                    f"(pid {after['pid']}) started {end - start_:.3f} s before attempt "
                    f"{before['attempt']} (pid {before['pid']}) ended"
                )
    return problems


@dataclass
class RaceResult:
    """What the racing workers did, and every problem the checks found."""

    workers: list[dict[str, Any]]
    problems: list[str]
    calls_by_worker: dict[int, int]
    sagas_by_worker: dict[int, int]
    outcomes: Counter[str]
    seed_seconds: float
    race_seconds: float

    def summary(self) -> str:
        """A few lines for the test output."""
        per_worker = [
            f"pid {w['pid']}: resumed {w.get('resumed', 0)}, lost {w.get('taken_over', 0)} "
            f"races, {self.calls_by_worker.get(w['pid'], 0)} calls in "
            f"{self.sagas_by_worker.get(w['pid'], 0)} sagas, {w.get('passes', 0)} passes"
            for w in self.workers
        ]
        return (
            f"seeded in {self.seed_seconds:.1f} s, raced in {self.race_seconds:.1f} s; "
            f"outcomes {dict(self.outcomes)}\n  " + "\n  ".join(per_worker)
        )


def race(
    env: dict[str, str],
    workdir: Path,
    *,
    seed: int,
    pending: int = 500,
    crashed: int = 500,
    workers: int = 4,
    timeout: float = 2.0,
    pause: float = 0.002,
    deadline: float = 50.0,
) -> RaceResult:
    """Seed `pending` + `crashed` sagas, then let `workers` processes recover them at once."""
    plans = race_plans(random.Random(seed), pending, crashed)
    log_path = str(workdir / "race.log")
    schema = SagaApplication(env=env)
    schema.close()
    began = time.monotonic()
    code = join(start(_seed_child, env, plans, log_path), 60, "seeding child")
    assert code == -signal.SIGKILL, f"the seeding child exited with {code}, not SIGKILL"
    seeded = time.monotonic()
    barrier = FORK.Barrier(workers)
    results = [str(workdir / f"worker-{i}.json") for i in range(workers)]
    processes = [
        start(_race_worker, env, log_path, result, timeout, pause, barrier, deadline)
        for result in results
    ]
    codes = [join(p, deadline + 30, "racing worker") for p in processes]
    raced = time.monotonic()
    assert codes == [0] * workers, f"racing workers exited with {codes}"
    reports = [json.loads(Path(r).read_text()) for r in results]
    lines = read_log(log_path)
    died_at = {line["pid"]: line["t"] for line in lines if line["kind"] == KILL}
    problems = [
        f"worker {r['pid']} gave up after {deadline} s: {r}" for r in reports if r.get("gave_up")
    ]
    problems += [f"worker {r['pid']} failed sagas: {r['failed']}" for r in reports if r["failed"]]
    app = checker(env)
    app.register(RACE)
    try:
        flying = app.statuses(status=IN_FLIGHT_STATES, limit=10)
        if flying:
            problems.append(f"in flight after the race: {[str(r.saga_id) for r in flying]}")
        counts = app.stats()
        outcomes: Counter[str] = Counter()
        for (name, status), n in counts.items():
            if name == RACE.name:
                outcomes[status] += n
        if outcomes[COMPLETED] + outcomes[COMPENSATED] != len(plans):
            problems.append(f"{len(plans)} sagas, but the projection counts {dict(outcomes)}")
        problems += [f"verify(): {p}" for p in app.verify()]
        problems += check_sagas(app, [(p.saga_id, p.fail_at) for p in plans], lines)
        problems += check_overlaps(lines, died_at)
    finally:
        app.close()
    worker_pids = {r["pid"] for r in reports}
    calls = Counter(
        line["pid"] for line in lines if line["pid"] in worker_pids and line["kind"] != KILL
    )
    sagas = {
        pid: len({line["saga"] for line in lines if line["pid"] == pid and line["kind"] != KILL})
        for pid in worker_pids
    }
    return RaceResult(
        workers=reports,
        problems=problems,
        calls_by_worker={pid: calls[pid] for pid in worker_pids},
        sagas_by_worker=sagas,
        outcomes=outcomes,
        seed_seconds=seeded - began,
        race_seconds=raced - seeded,
    )
