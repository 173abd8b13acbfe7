"""Settings: what saga_es reads beside eventsourcing's, and errors that name the setting.

A wrong setting is reported as a `ConfigurationError` naming it, never as a driver
traceback, and never echoing a password.
"""

from __future__ import annotations

import binascii
import math
import re
from typing import Any

from eventsourcing.persistence import InterfaceError, OperationalError
from eventsourcing.utils import Environment

from saga_es.errors import ConfigurationError

SAGA_STEP_TIMEOUT = "SAGA_STEP_TIMEOUT"
"""Seconds recovery leaves a step to its worker, unless the step sets `timeout`."""
DEFAULT_STEP_TIMEOUT = 60.0


def step_timeout(given: float | None, env: Environment) -> float:
    """The default step timeout: the argument, else `SAGA_STEP_TIMEOUT`, else 60 s."""
    raw: Any = given if given is not None else env.get(SAGA_STEP_TIMEOUT)
    if raw is None or raw == "":
        return DEFAULT_STEP_TIMEOUT
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if isinstance(raw, bool) or not (value >= 0 and math.isfinite(value)):
        raise ConfigurationError(
            SAGA_STEP_TIMEOUT, f"must be a finite number of seconds >= 0, got {raw!r}"
        )
    return value


_SECRET_SETTINGS = re.compile(r"PASSWORD|CIPHER_KEY|SSLPASSWORD")


class Settings(Environment):
    """eventsourcing's settings, whose repr and str show `***` for passwords and keys."""

    def __repr__(self) -> str:
        shown = {k: "***" if v and _SECRET_SETTINGS.search(k) else v for k, v in self.items()}
        return f"{type(self).__name__}({self.name!r}, {shown!r})"

    __str__ = __repr__


_SETTING_IN_MESSAGE = re.compile(r"'([A-Z][A-Z0-9_]+)'")
_PG_HINTS = (
    ("password", "POSTGRES_PASSWORD"),
    ("role", "POSTGRES_USER"),
    ("database", "POSTGRES_DBNAME"),
    ("translate host name", "POSTGRES_HOST"),
    ("connection refused", "POSTGRES_PORT"),
    ("timeout", "POSTGRES_HOST"),
    ("max_size", "POSTGRES_MAX_OVERFLOW"),  # psycopg_pool's names for the pool's bounds
    ("min_size", "POSTGRES_POOL_SIZE"),
)
_TRUTH_VALUE = re.compile(r"invalid truth value '([^']*)'")


_TOPIC_SETTINGS = (
    "CIPHER_TOPIC",
    "COMPRESSOR_TOPIC",
    "TRANSCODER_TOPIC",
    "MAPPER_TOPIC",
    "APPLICATION_RECORDER_TOPIC",
    "PROCESS_RECORDER_TOPIC",
    "POSTGRES_GET_PASSWORD_TOPIC",
)
DEFAULT_CIPHER_TOPIC = "eventsourcing.cipher:AESCipher"
"""eventsourcing's cipher when `CIPHER_KEY` is set alone: it needs pycryptodome."""


def configuration_error(error: Exception, env: Environment) -> ConfigurationError:
    """Name the setting behind a construction failure, never echoing a password or key.

    A failure to reach the store (the driver's operational or interface error, a refused
    connection) is marked `unreachable`: a worker retries it, and exits on any other
    (eventsourcing's missing or malformed settings are `EnvironmentError`, an `OSError`).
    """
    named = _named_error(error, env)
    named.unreachable = isinstance(error, OperationalError | InterfaceError | ConnectionError)
    return named


def _named_error(error: Exception, env: Environment) -> ConfigurationError:
    message = str(error) or type(error).__name__
    for secret in (env.get("POSTGRES_PASSWORD"), env.get("CIPHER_KEY")):
        if secret:
            message = message.replace(secret, "***")
    if isinstance(error, binascii.Error) or message.startswith("Invalid key size"):
        return ConfigurationError(
            "CIPHER_KEY",
            f"expected an AES key of 16, 24 or 32 bytes in base64, such as "
            f"AESCipher.create_key(num_bytes=32) makes ({message})",
        )
    if "failed to resolve topic" in message.lower():
        for name in _TOPIC_SETTINGS:
            if env.get(name) and f"'{env.get(name)}'" in message:
                return ConfigurationError(name, message)
        if f"'{DEFAULT_CIPHER_TOPIC}'" in message:
            return ConfigurationError(
                "CIPHER_TOPIC",
                f"CIPHER_KEY alone means {DEFAULT_CIPHER_TOPIC}, which needs pycryptodome; "
                "install it, or set CIPHER_TOPIC=eventsourcing.cryptography:AESCipher "
                f"(the cryptography package) ({message})",
            )
    truth = _TRUTH_VALUE.search(message)
    if truth:  # eventsourcing's strtobool names the value, not the setting that holds it
        for name, value in env.items():
            if value == truth.group(1):
                return ConfigurationError(name, message)
    match = _SETTING_IN_MESSAGE.search(message)
    if match:
        return ConfigurationError(match.group(1), message)
    module = env.get("PERSISTENCE_MODULE", "")
    lowered = message.lower()
    if "postgres" in module:
        if env.get("POSTGRES_SCHEMA") and f'schema "{env.get("POSTGRES_SCHEMA")}"' in message:
            return ConfigurationError("POSTGRES_SCHEMA", message)  # the server knows no such schema
        for needle, setting in _PG_HINTS:
            if needle in lowered:
                return ConfigurationError(setting, message)
        return ConfigurationError("POSTGRES_HOST", message)
    if "sqlite" in module:
        return ConfigurationError("SQLITE_DBNAME", message)
    return ConfigurationError("PERSISTENCE_MODULE", message)


SAGA_COMMIT_MAX_BATCH = "SAGA_COMMIT_MAX_BATCH"
"""Most sagas' boundaries one group commit writes (async sagas on one event loop)."""
SAGA_COMMIT_MAX_WAIT = "SAGA_COMMIT_MAX_WAIT"
"""Seconds a group commit waits for more boundaries before writing (0: never waits)."""


def commit_settings(env: Environment) -> tuple[int, float]:
    """The group commit's batch bound and wait, from the settings."""
    raw_batch, raw_wait = env.get(SAGA_COMMIT_MAX_BATCH), env.get(SAGA_COMMIT_MAX_WAIT)
    try:
        batch = 100 if raw_batch in (None, "") else int(raw_batch)
    except (TypeError, ValueError):
        batch = 0
    if batch < 1:
        raise ConfigurationError(
            SAGA_COMMIT_MAX_BATCH, f"expected a whole number of sagas >= 1, got {raw_batch!r}"
        )
    try:
        wait = 0.0 if raw_wait in (None, "") else float(raw_wait)
    except (TypeError, ValueError):
        wait = -1.0
    if not 0 <= wait <= 10:
        raise ConfigurationError(
            SAGA_COMMIT_MAX_WAIT, f"expected seconds between 0 and 10, got {raw_wait!r}"
        )
    return batch, wait


SAGA_MAX_RESUMPTIONS = "SAGA_MAX_RESUMPTIONS"
"""Times recovery re-runs a step whose outcome was lost before calling it a poison step."""
DEFAULT_MAX_RESUMPTIONS = 3


def max_resumptions(given: int | None, env: Environment) -> int:
    """The poison-step bound: the argument, else `SAGA_MAX_RESUMPTIONS`, else 3."""
    raw: Any = given if given is not None else env.get(SAGA_MAX_RESUMPTIONS)
    if raw is None or raw == "":
        return DEFAULT_MAX_RESUMPTIONS
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = -1
    if isinstance(raw, bool) or value < 0 or str(value) != str(raw).strip():
        raise ConfigurationError(
            SAGA_MAX_RESUMPTIONS, f"expected a whole number of resumptions >= 0, got {raw!r}"
        )
    return value
