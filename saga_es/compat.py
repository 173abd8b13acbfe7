"""Replay stored sagas against a (new) definition, before deploying it.

A saga keeps the steps, groups and compensations it recorded when it started, and
recovery looks its definition up by the recorded name and version, then calls steps
by name. New code that renamed, removed or reordered a step, or dropped a
compensation, can leave the sagas in flight unrecoverable; `check` says which, and
where in each stream, while the old code still runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from uuid import UUID

from saga_es import machine
from saga_es.aggregate import Saga, StepCompleted, replay_checked
from saga_es.definition import SagaDefinition
from saga_es.errors import DefinitionError, ForkRefused, SagaError, StepNotReached
from saga_es.status import IN_FLIGHT_STATES, SagaStatus

if TYPE_CHECKING:
    from saga_es.application import SagaApplication

VERSION = "version"
UNREADABLE = "unreadable"
REMOVED = "removed"
RENAMED = "renamed"
REORDERED = "reordered"
GROUP_CHANGED = "group-changed"
COMPENSATION_REMOVED = "compensation-removed"
FALLBACK_REMOVED = "fallback-removed"
ADDED = "added"
KINDS = (
    VERSION,
    UNREADABLE,
    REMOVED,
    RENAMED,
    REORDERED,
    GROUP_CHANGED,
    COMPENSATION_REMOVED,
    FALLBACK_REMOVED,
    ADDED,
)
"""Every `Divergence.kind`; a CLI or a dashboard can rely on this list."""

LIVE_STATES = (*IN_FLIGHT_STATES, machine.STUCK)
"""States in which a saga may still call its definition: recovery or `resolve` drive it."""
ENDED_STATES = (machine.COMPLETED, machine.COMPENSATED, machine.CANCELLED)
"""States nothing drives again: such sagas are checked for information, never blocking."""

_FORWARD = (machine.PENDING, machine.RUNNING)
_PAGE = 500


@dataclass(frozen=True)
class Divergence:
    """One way a stored saga and the definition disagree.

    `version` is the saga's event where it first matters (1: what `SagaStarted`
    recorded). `blocking`: recovering or resolving the saga with this definition would
    fail or do something other than what the saga recorded; an ended saga never
    blocks, as nothing will drive it again.
    """

    saga_id: UUID
    version: int
    kind: str
    step: str | None
    message: str
    blocking: bool

    def __str__(self) -> str:
        what = self.kind if self.step is None else f"{self.kind} {self.step}"
        flag = " [blocking]" if self.blocking else ""
        return f"saga {self.saga_id} v{self.version}: {what}: {self.message}{flag}"


@dataclass
class CheckReport:
    """Which sagas were replayed against definition `definition` v`version`, and how they differ.

    `truncated`: `limit` stopped the listing, so sagas of that name went unchecked.
    """

    definition: str
    version: int
    checked: list[UUID]
    divergences: list[Divergence]
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True if no checked saga would be stranded by deploying the definition."""
        return not any(d.blocking for d in self.divergences)

    def by_saga(self) -> dict[UUID, list[Divergence]]:
        """Every checked saga, in checked order, with its divergences (maybe none)."""
        found: dict[UUID, list[Divergence]] = {saga_id: [] for saga_id in self.checked}
        for divergence in self.divergences:
            found.setdefault(divergence.saga_id, []).append(divergence)
        return found

    def __str__(self) -> str:
        lines = [f"check of {self.definition!r} v{self.version}:"]
        lines += [f"  {d}" for d in self.divergences]
        sagas = self.by_saga()
        diverging = sum(1 for found in sagas.values() if found)
        blocking = sum(1 for found in sagas.values() if any(d.blocking for d in found))
        summary = f"{len(self.checked)} saga(s) checked, {diverging} diverge ({blocking} blocking)"
        if self.truncated:
            summary += "; the limit stopped the listing: more sagas of that name exist"
        lines.append(summary)
        return "\n".join(lines)


def check(
    app: SagaApplication,
    definition: SagaDefinition,
    *,
    recent: timedelta | None = timedelta(days=1),
    limit: int | None = None,
) -> CheckReport:
    """Replay the sagas of `definition.name` that matter for a deploy against it.

    Those are every saga in flight or stuck (new code must drive them) and those that
    ended within `recent` of now (None: all), which show what recently stored sagas
    look like to the new code. In-flight and stuck sagas come first, so `limit`
    (sagas checked at most) never drops them in favour of ended ones.
    """
    if not isinstance(definition, SagaDefinition):
        raise TypeError(f"expected a SagaDefinition, got {type(definition).__name__}")
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    if recent is not None and not isinstance(recent, timedelta):
        raise TypeError(f"recent must be None or a timedelta, got {recent!r}")
    if recent is not None and recent < timedelta(0):
        raise ValueError(f"recent must be None or a duration >= 0, got {recent!r}")
    names = sorted({name for name, _ in app.stats()})
    if definition.name not in names:
        raise ValueError(
            f"no saga in the store was started from a definition named {definition.name!r} "
            f"(checking {definition.name!r} v{definition.version}); stored names: {names}"
        )
    cutoff = None if recent is None else datetime.now(UTC) - recent
    rows = _rows(app, definition.name, cutoff)
    report = CheckReport(definition.name, definition.version, [], [])
    seen: set[UUID] = set()
    for row in rows:
        if row.saga_id in seen:  # it ended while the live ones were listed
            continue
        seen.add(row.saga_id)
        if limit is not None and len(report.checked) == limit:
            report.truncated = True
            break
        report.checked.append(row.saga_id)
        report.divergences += _check_one(app, definition, row)
    return report


def _rows(app: SagaApplication, name: str, cutoff: datetime | None) -> Iterator[SagaStatus]:
    """Status rows of the sagas to check: every live one, then those ended after `cutoff`."""
    yield from _pages(app, name, LIVE_STATES)
    for row in _pages(app, name, ENDED_STATES):
        if cutoff is None or _utc(row.updated_at) > cutoff:
            yield row


def _pages(app: SagaApplication, name: str, states: Sequence[str]) -> Iterator[SagaStatus]:
    after: UUID | None = None
    while True:
        page = app.statuses(status=states, name=name, after=after, limit=_PAGE)
        yield from page
        if len(page) < _PAGE:
            return
        after = page[-1].saga_id


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _check_one(
    app: SagaApplication, definition: SagaDefinition, row: SagaStatus
) -> list[Divergence]:
    """One saga's divergences, read as recovery reads it: every event checked by the machine."""
    live = row.status in LIVE_STATES
    try:
        events = app.saga_events(row.saga_id)
    except SagaError as e:
        version = getattr(e, "version", None)
        why = f"its stream cannot be read, so nothing can resume it: {e}"
        at = version if isinstance(version, int) else 1
        return [Divergence(row.saga_id, at, UNREADABLE, None, why, live)]
    saga, problem = replay_checked(None, events)
    if problem is not None or saga is None:
        at = 1 if problem is None else problem.version
        why = f"the state machine rejects its stream, so recovery would refuse it: {problem}"
        return [Divergence(row.saga_id, at, UNREADABLE, None, why, live)]
    own = app.definitions.get((saga.name, saga.definition_version))
    if own is not None and own is not definition and own.version != definition.version:
        # The code registers the saga's own version too: recovery will use that one, so
        # the saga is compared with it, and the version mismatch is still reported.
        return sorted(
            [_kept_version(saga, definition), *_Compare(saga, own, events).divergences()],
            key=lambda d: d.version,
        )
    return _Compare(saga, definition, events).divergences()


def _kept_version(saga: Saga, definition: SagaDefinition) -> Divergence:
    """The saga's version differs, but it stays registered: reported, never blocking."""
    old, new = saga.definition_version, definition.version
    message = (
        f"started from v{old}, not v{new}; v{old} is registered here too, so recovery and "
        f"resolve will use it: the new code must keep v{old} registered until its sagas end"
    )
    return Divergence(saga.id, 1, VERSION, None, message, False)


_Stage = frozenset[str]


class _Compare:
    """One saga, rebuilt, against one definition: what each recorded step still needs."""

    def __init__(
        self, saga: Saga, definition: SagaDefinition, events: Sequence[Saga.Event]
    ) -> None:
        self.saga = saga
        self.definition = definition
        self.live = saga.status in LIVE_STATES
        self.forward = saga.status in _FORWARD
        self.recorded = list(saga.steps)
        self.new = definition.step_names
        self.common = set(self.recorded) & set(self.new)
        self.first: dict[str, int] = {}
        self.done_at: dict[str, int] = {}
        for event in events:
            step = vars(event).get("step")
            if isinstance(step, str) and step:
                self.first.setdefault(step, event.originator_version)
            if isinstance(event, StepCompleted):
                self.done_at[event.step] = event.originator_version
        self.found: list[Divergence] = []

    def divergences(self) -> list[Divergence]:
        """Every divergence, ordered by the version where it first matters."""
        self._version()
        self._removed_and_added()
        self._reordered()
        self._groups()
        self._undo_and_fallback()
        return sorted(self.found, key=lambda d: d.version)

    def _add(self, kind: str, step: str | None, message: str, blocking: bool, at: int = 0) -> None:
        version = at or (self.first.get(step, 1) if step is not None else 1)
        self.found.append(Divergence(self.saga.id, version, kind, step, message, blocking))

    def _ended(self) -> str:
        return f"; the saga is {self.saga.status}, so nothing will drive it again"

    # -- the checks ----------------------------------------------------------------------

    def _version(self) -> None:
        old, new = self.saga.definition_version, self.definition.version
        if old == new:
            return
        message = (
            f"started from v{old}, not v{new}: recovery and resolve look definitions up by "
            f"name and version, so keep v{old} registered alongside v{new} until its sagas end"
        )
        self._add(VERSION, None, message + ("" if self.live else self._ended()), self.live)

    def _removed_and_added(self) -> None:
        removed = [s for s in self.recorded if s not in self.common]
        added = [s for s in self.new if s not in self.common]
        renamed: dict[str, str] = {}
        for gap, olds in _by_gap(self.recorded, removed, self.common).items():
            news = _by_gap(self.new, added, self.common).get(gap, [])
            renamed.update(zip(olds, news, strict=False))
        for step in removed:  # else a new name at the same index
            i = self.recorded.index(step)
            new = self.new[i] if i < len(self.new) else None
            if step not in renamed and new in added and new not in renamed.values():
                renamed[step] = str(new)
        for step in removed:
            need = self._need(step)
            if step in renamed:
                kind, what = RENAMED, f"renamed to {renamed[step]!r} (a new name in its place)"
            else:
                kind, what = REMOVED, "no longer in the definition"
            if need:
                tail = f", but this saga still needs it ({need}): recovery would fail to find it"
            elif self.live:
                tail = ", and this saga no longer needs it"
            else:
                tail = self._ended()
            self._add(kind, step, what + tail, bool(need))
        for step in added:
            if step in renamed.values():
                continue
            message = (
                "not recorded by this saga: a saga runs the steps it started with, "
                "so this one will not run it"
            )
            self._add(ADDED, step, message, False)

    def _need(self, step: str) -> str:
        """Why the live saga will still call `step`'s code by name, or "" if it will not."""
        saga = self.saga
        if not self.live:
            return ""
        if step in saga.in_flight:
            return "its action is in flight"
        if step in saga.compensating:
            return "its compensation is in flight"
        if self.forward and step not in saga.completed:
            return "it has yet to run"
        if self._owes_undo(step):
            return "its effect may have to be undone"
        return ""

    def _owes_undo(self, step: str) -> bool:
        """Whether the saga may yet compensate `step` (by the compensations it recorded)."""
        saga = self.saga
        owners = saga.fallback_compensable if step in saga.on_fallback else saga.compensable
        done = step in saga.completed or step in saga.to_compensate
        return self.live and step in owners and step not in saga.compensated and done

    def _reordered(self) -> None:
        saga = self.saga
        rec = {s: i for i, s in enumerate(self.recorded)}
        new = {s: i for i, s in enumerate(self.new)}
        rec_stage, new_stage = self._stages()
        common = [s for s in self.recorded if s in self.common]
        inverted: dict[str, set[str]] = {s: set() for s in common}
        for i, a in enumerate(common):
            for b in common[i + 1 :]:
                same_group = rec_stage[a] == rec_stage[b] and new_stage[a] == new_stage[b]
                if not same_group and (new[a] < new[b]) != (rec[a] < rec[b]):
                    inverted[a].add(b)
                    inverted[b].add(a)
        pairs = {frozenset((a, b)) for a, partners in inverted.items() for b in partners}
        while pairs:  # name the fewest steps that explain every inversion
            counts = {s: sum(1 for p in pairs if s in p) for s in common}
            moved = max(reversed(common), key=lambda s: counts[s])
            others = sorted(
                (s for p in pairs if moved in p for s in p - {moved}), key=rec.__getitem__
            )
            pairs = {p for p in pairs if moved not in p}
            after = [s for s in others if new[s] < new[moved]]
            before = [s for s in others if new[s] > new[moved]]
            where = " and ".join(
                f"{side} {_names(steps)}"
                for side, steps in (("after", after), ("before", before))
                if steps
            )
            pending = [
                s for s in self.recorded if s in (moved, *others) and s not in saga.completed
            ]
            blocking = self.forward and bool(pending)
            if blocking:
                tail = (
                    f"; this saga has yet to run {_names(pending)} and keeps its recorded "
                    f"order {_names(self.recorded)}, not the new one"
                )
            elif self.live:
                tail = (
                    "; this saga has run them already (or never will), so order no longer matters"
                )
            else:
                tail = self._ended()
            self._add(REORDERED, moved, f"now comes {where}, unlike when recorded{tail}", blocking)

    def _stages(self) -> tuple[dict[str, _Stage], dict[str, _Stage]]:
        """Each common step's group, as recorded and as now defined (itself, outside one)."""
        recorded = _stage_map(self.saga.groups, self.common)
        new = _stage_map(self.definition.groups, self.common)
        return recorded, new

    def _groups(self) -> None:
        rec_stage, new_stage = self._stages()
        changed = [s for s in self.recorded if s in self.common and rec_stage[s] != new_stage[s]]
        seen: set[str] = set()
        for step in changed:
            if step in seen:
                continue
            component: set[str] = set()
            todo = [step]
            while todo:  # every step whose grouping changed along with this one's
                s = todo.pop()
                if s in component:
                    continue
                component.add(s)
                todo += [t for t in rec_stage[s] | new_stage[s] if t in changed]
            seen |= component
            members = [s for s in self.recorded if s in component]
            was = _describe([rec_stage[s] for s in members], self.recorded)
            now = _describe([new_stage[s] for s in members], self.new)
            pending = [s for s in members if s not in self.saga.completed]
            blocking = self.forward and bool(pending)
            if blocking:
                tail = f"; this saga has yet to run {_names(pending)} and keeps its recorded groups"
            elif self.live:
                tail = "; this saga has run them already (or never will)"
            else:
                tail = self._ended()
            self._add(GROUP_CHANGED, members[0], f"recorded as {was}, now {now}{tail}", blocking)

    def _undo_and_fallback(self) -> None:
        saga = self.saga
        for name in self.recorded:
            if name not in self.common:
                continue
            step = self.definition.step(name)
            on_fallback = name in saga.on_fallback
            touched = (  # its action took effect, or may have
                name in saga.completed
                or name in saga.in_flight
                or name in saga.to_compensate
                or name in saga.compensating
                or name in saga.compensated
            )
            ahead = self.forward and not touched
            if not (touched or ahead):
                paths = []
            elif touched:
                paths = [on_fallback]
            else:  # not run yet: it may complete either way, while the fallback exists
                paths = [False, True] if step.fallback is not None else [False]
            for fallback in paths:
                owners = saga.fallback_compensable if fallback else saga.compensable
                undo = step.fallback_compensation if fallback else step.compensation
                if name not in owners or undo is not None:
                    continue
                what = "its fallback's compensation" if fallback else "its compensation"
                blocking = self.live and name not in saga.compensated
                if blocking:
                    why = "its effect may have to be undone" if touched else "it may yet run"
                    tail = f" ({why}): undoing it would fail and leave the saga stuck"
                elif self.live:
                    tail = ", but this saga has undone it already"
                else:
                    tail = self._ended()
                message = f"recorded with {what}, which the definition no longer has{tail}"
                at = self.done_at.get(name, 0)
                self._add(COMPENSATION_REMOVED, name, message, blocking, at)
            running_fallback = on_fallback and (name in saga.in_flight or name in saga.retrying)
            if self.forward and running_fallback and step.fallback is None:
                message = (
                    "this saga is running the step's fallback, which the definition no "
                    "longer has: resuming it would fail with nothing to call"
                )
                self._add(FALLBACK_REMOVED, name, message, True)


def _by_gap(
    steps: Sequence[str], chosen: Sequence[str], common: set[str]
) -> dict[tuple[str | None, str | None], list[str]]:
    """`chosen` steps by the common steps around each: a renamed step keeps its place."""
    gaps: dict[tuple[str | None, str | None], list[str]] = {}
    for i, step in enumerate(steps):
        if step not in chosen:
            continue
        before = next((s for s in reversed(steps[:i]) if s in common), None)
        after = next((s for s in steps[i + 1 :] if s in common), None)
        gaps.setdefault((before, after), []).append(step)
    return gaps


def _stage_map(groups: Sequence[Sequence[str]], common: set[str]) -> dict[str, _Stage]:
    stages = {s: frozenset((s,)) for s in common}
    for group in groups:
        members = frozenset(s for s in group if s in common)
        for s in members:
            stages[s] = members
    return stages


def _describe(stages: Sequence[_Stage], order: Sequence[str]) -> str:
    """Stages in `order`, a group as Parallel(...), a lone step by its name."""
    seen: list[_Stage] = []
    for stage in stages:
        if stage not in seen:
            seen.append(stage)
    seen.sort(key=lambda stage: min(order.index(s) for s in stage))
    parts = []
    for stage in seen:
        names = [s for s in order if s in stage]
        parts.append(f"Parallel({', '.join(names)})" if len(names) > 1 else names[0])
    return ", ".join(parts)


def _names(steps: Sequence[str]) -> str:
    return ", ".join(repr(s) for s in steps)


def fork(
    app: SagaApplication,
    source: Saga,
    from_step: str,
    definition: SagaDefinition,
    key: str | None,
) -> Saga:
    """Start and run the fork of `source` from `from_step` (see `SagaApplication.fork`)."""
    if definition.name != source.name:
        raise ValueError(
            f"saga {source.id} was started from {source.name!r}: it cannot be forked under "
            f"a definition named {definition.name!r}"
        )
    if source.status in IN_FLIGHT_STATES:
        raise ValueError(
            f"saga {source.id} is {source.status}: fork a saga that has ended (or is stuck), "
            "else two sagas would run; cancel it first"
        )
    if from_step not in source.attempts:
        raise StepNotReached(source.id, from_step)
    if from_step not in definition.step_names:
        raise DefinitionError(
            f"saga {definition.name!r} v{definition.version} has no step {from_step!r} to fork from"
        )
    if len(source.group_of(from_step)) > 1:
        raise ValueError(f"step {from_step!r} is in a parallel group: fork from the group's start")
    carried = source.steps[: source.steps.index(from_step)]
    events = app.saga_events(source.id)
    started = next(
        e.originator_version
        for e in events
        if isinstance(e, Saga.StepStarted) and e.step == from_step
    )
    divergences = _carry(source, definition, carried, from_step, started)
    if divergences:
        raise ForkRefused(source.id, divergences)
    before = app.get(source.id, version=started - 1)
    return app._run_fork(definition, before, from_step, carried, key)


def _carry(
    source: Saga, definition: SagaDefinition, carried: list[str], from_step: str, at: int
) -> list[Divergence]:
    """Why `definition` cannot carry `carried` and go on from `from_step`, if it cannot."""
    new = definition.step_names
    found = []
    for step in carried:
        if step not in new:
            why = "carried over by the fork, but the definition no longer has it"
            found.append(Divergence(source.id, at, REMOVED, step, why, True))
    if not found and new[: len(carried) + 1] != [*carried, from_step]:
        why = f"the definition's steps start {new[: len(carried) + 1]}, not {[*carried, from_step]}"
        found.append(Divergence(source.id, at, REORDERED, from_step, why, True))
    return found
