"""saga_es: sagas as event-sourced aggregates, guarded by a state machine."""

from saga_es.aggregate import (
    CompensationFailed,
    CompensationRan,
    CompensationStarted,
    Saga,
    SagaCompensated,
    SagaCompleted,
    SagaEvent,
    SagaStarted,
    SagaStuck,
    StepCompleted,
    StepFailed,
    StepStarted,
)
from saga_es.application import SagaApplication, SagaUpdate
from saga_es.definition import SagaDefinition, Step
from saga_es.errors import (
    ConfigurationError,
    ContextError,
    DefinitionError,
    IllegalTransition,
    SagaError,
    SagaNotFound,
    VersionNotFound,
)
from saga_es.machine import TERMINAL_STATES

__all__ = [
    "TERMINAL_STATES",
    "CompensationFailed",
    "CompensationRan",
    "CompensationStarted",
    "ConfigurationError",
    "ContextError",
    "DefinitionError",
    "IllegalTransition",
    "Saga",
    "SagaApplication",
    "SagaCompensated",
    "SagaCompleted",
    "SagaDefinition",
    "SagaError",
    "SagaEvent",
    "SagaNotFound",
    "SagaStarted",
    "SagaStuck",
    "SagaUpdate",
    "Step",
    "StepCompleted",
    "StepFailed",
    "StepStarted",
    "VersionNotFound",
]
