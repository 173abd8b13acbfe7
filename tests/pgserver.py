"""A throw-away PostgreSQL server for the test session.

`PgServer.start()` runs `initdb` into a fresh temporary folder and starts the
cluster on 127.0.0.1, on a free port, with its unix socket in that folder and a
password for its superuser, so applications connect with `POSTGRES_USER` and
`POSTGRES_PASSWORD` as a user would. `stop()` stops it and deletes the folder.

PostgreSQL refuses to run as root: when the tests run as root, the folder is
handed to the `postgres` user and `initdb`/`pg_ctl` run through
`runuser -u postgres --`.

Set `SAGA_ES_TEST_POSTGRES=host:port:user:password` to use a running server
instead (the user must be allowed to create databases).

Every failure raises `PgServerError` with what was tried and what it said:
the tests that need PostgreSQL never skip.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

OVERRIDE = "SAGA_ES_TEST_POSTGRES"
RUN_AS = "postgres"
SUPERUSER = "saga_es_test"


class PgServerError(RuntimeError):
    """The test PostgreSQL server could not be started, reached or used."""


def find_bin(name: str) -> str:
    """`name` on PATH, else the newest `/usr/lib/postgresql/*/bin/name`."""
    found = shutil.which(name)
    if found:
        return found

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.parent.name
        return tuple(int(x) for x in re.findall(r"\d+", part)) or (0,)

    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=version)
    if candidates:
        return candidates[-1]
    raise PgServerError(
        f"cannot find {name!r} on PATH or in /usr/lib/postgresql/*/bin: install PostgreSQL "
        f"(e.g. apt-get install postgresql) or set {OVERRIDE}=host:port:user:password"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """Where the test server listens, and how to make and drop databases on it."""

    host: str
    port: int
    user: str
    password: str
    folder: Path | None = None
    pg_ctl: str | None = None
    run_as_postgres: bool = False
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _created: list[str] = field(default_factory=list)
    _free: list[str] = field(default_factory=list)

    # -- starting and stopping ---------------------------------------------------------

    @classmethod
    def from_environment(cls) -> PgServer:
        """The server named by `SAGA_ES_TEST_POSTGRES`, else a new one started here."""
        spec = os.environ.get(OVERRIDE, "").strip()
        if not spec:
            return cls.start()
        parts = spec.split(":", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            raise PgServerError(
                f"{OVERRIDE} must be host:port:user:password, got {len(parts)} part(s)"
            )
        host, port, user, password = parts
        server = cls(host=host, port=int(port), user=user, password=password)
        server.check()
        return server

    @classmethod
    def start(cls) -> PgServer:
        """initdb a new cluster in a temporary folder and start it on a free port."""
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        run_as_postgres = os.geteuid() == 0
        folder = Path(tempfile.mkdtemp(prefix="saga_es_pg_"))
        password = secrets.token_urlsafe(16)
        server = cls(
            host="127.0.0.1",
            port=0,
            user=SUPERUSER,
            password=password,
            folder=folder,
            pg_ctl=pg_ctl,
            run_as_postgres=run_as_postgres,
        )
        try:
            if run_as_postgres:
                try:
                    owner = pwd.getpwnam(RUN_AS)
                except KeyError:
                    raise PgServerError(
                        f"running as root, and there is no {RUN_AS!r} user to run PostgreSQL "
                        f"as; create one or set {OVERRIDE}"
                    ) from None
                os.chown(folder, owner.pw_uid, owner.pw_gid)
            pwfile = folder / "pwfile"
            pwfile.write_text(password + "\n")
            if run_as_postgres:
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            pwfile.chmod(0o600)
            server._run(
                initdb,
                "-D",
                str(server.data),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                what="initdb",
            )
            pwfile.unlink()
            server._start_listening()
            server.check()
        except BaseException:
            with contextlib.suppress(PgServerError):  # keep the error that stopped us
                server.stop()
            raise
        return server

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        assert self.folder is not None
        return self.folder / "data"

    def _start_listening(self) -> None:
        assert self.folder is not None
        assert self.pg_ctl is not None
        log = self.folder / "server.log"
        for attempt in range(3):
            self.port = free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={self.port}",
                    f"-c unix_socket_directories={self.folder}",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                    "-c shared_buffers=32MB",
                ]
            )
            try:
                self._run(
                    self.pg_ctl,
                    "start",
                    "-D",
                    str(self.data),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    options,
                    what="pg_ctl start",
                )
                return
            except PgServerError:
                text = log.read_text(errors="replace") if log.exists() else ""
                if attempt < 2 and "already in use" in text:
                    continue  # lost the port to another process: try another
                raise

    def stop(self) -> None:
        """Drop the test databases; stop a server started here and delete its folder."""
        if self.folder is None:
            self.drop_databases()
            return
        try:
            if self.pg_ctl and (self.data / "postmaster.pid").exists():
                self._run(
                    self.pg_ctl,
                    "stop",
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    what="pg_ctl stop",
                )
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _run(self, *argv: str, what: str) -> None:
        command = list(argv)
        if self.run_as_postgres:
            command = ["runuser", "-u", RUN_AS, "--", *command]
        try:
            done = subprocess.run(
                command,
                cwd=self.folder,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PgServerError(f"{what} could not run ({' '.join(command)}): {e}") from e
        if done.returncode != 0:
            log = ""
            if self.folder is not None and (self.folder / "server.log").exists():
                log = (self.folder / "server.log").read_text(errors="replace")[-2000:]
            raise PgServerError(
                f"{what} failed with exit code {done.returncode}\n"
                f"command: {' '.join(command)}\n"
                f"stdout: {done.stdout.strip()}\nstderr: {done.stderr.strip()}"
                + (f"\nserver log (end):\n{log}" if log else "")
            )

    # -- using it ----------------------------------------------------------------------

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection, over TCP with the password, as the apps connect."""
        try:
            return psycopg.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                password=self.password,
                dbname=dbname,
                autocommit=True,
                connect_timeout=10,
            )
        except psycopg.Error as e:
            raise PgServerError(
                f"cannot connect to the test PostgreSQL at {self.host}:{self.port} as "
                f"{self.user!r}: {e}"
            ) from e

    def check(self) -> None:
        """Connect once, or raise saying why not."""
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.connect() as conn:
                    conn.execute("SELECT 1")
                return
            except PgServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_database(self) -> str:
        """A new empty database; its name."""
        name = f"saga_es_test_{os.getpid()}_{next(self._names)}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._created.append(name)
        return name

    def acquire_database(self) -> str:
        """An empty database for one test: a reset one if any is free, else a new one.

        CREATE DATABASE costs about 0.2 s here; emptying a used one costs about 10 ms.
        """
        if self._free:
            return self._free.pop()
        return self.create_database()

    def release_database(self, name: str) -> None:
        """Empty `name` (drop and recreate its `public` schema) for the next test.

        Connections still open on it would be a leak in the test: if the reset cannot
        take its locks quickly, the database is dropped instead, closing them.
        """
        try:
            with self.connect(name) as conn:
                conn.execute("SET lock_timeout = '5s'")
                with conn.transaction():
                    conn.execute("DROP SCHEMA public CASCADE")
                    conn.execute("CREATE SCHEMA public")
        except (psycopg.Error, PgServerError):
            self.drop_database(name)
            return
        self._free.append(name)

    def drop_database(self, name: str) -> None:
        """Drop `name`, closing any connection still open on it."""
        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        if name in self._created:
            self._created.remove(name)
        if name in self._free:
            self._free.remove(name)

    def drop_databases(self) -> None:
        """Drop every database made here (they matter on a server that outlives the tests)."""
        for name in list(self._created):
            self.drop_database(name)

    def env(self, dbname: str) -> dict[str, str]:
        """Application settings for database `dbname` on this server."""
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            "POSTGRES_DBNAME": dbname,
        }

    def __enter__(self) -> PgServer:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(PgServerError):
            self.stop()
