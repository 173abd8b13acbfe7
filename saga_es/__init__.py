"""saga_es: sagas as event-sourced aggregates, guarded by a state machine."""

from saga_es.aggregate import (
    CompensationFailed,
    CompensationRan,
    CompensationReconciled,
    CompensationStarted,
    Saga,
    SagaCompensated,
    SagaCompleted,
    SagaEvent,
    SagaStarted,
    SagaStuck,
    StepCompleted,
    StepFailed,
    StepReconciled,
    StepStarted,
    StreamProblem,
)
from saga_es.application import SagaApplication, SagaUpdate
from saga_es.definition import SagaDefinition, Step
from saga_es.errors import (
    ConfigurationError,
    ContextError,
    DefinitionError,
    DefinitionNotFound,
    IllegalTransition,
    SagaError,
    SagaNotFound,
    UnreadableEvent,
    VersionNotFound,
)
from saga_es.machine import TERMINAL_STATES
from saga_es.recovery import RecoveryReport
from saga_es.status import SagaStatus

__all__ = [
    "TERMINAL_STATES",
    "CompensationFailed",
    "CompensationRan",
    "CompensationReconciled",
    "CompensationStarted",
    "ConfigurationError",
    "ContextError",
    "DefinitionError",
    "DefinitionNotFound",
    "IllegalTransition",
    "RecoveryReport",
    "Saga",
    "SagaApplication",
    "SagaCompensated",
    "SagaCompleted",
    "SagaDefinition",
    "SagaError",
    "SagaEvent",
    "SagaNotFound",
    "SagaStarted",
    "SagaStatus",
    "SagaStuck",
    "SagaUpdate",
    "Step",
    "StepCompleted",
    "StepFailed",
    "StepReconciled",
    "StepStarted",
    "StreamProblem",
    "UnreadableEvent",
    "VersionNotFound",
]
