"""Where a study lives: one SQLite file (the default), a PostgreSQL server, or an Optuna journal file.

``--storage`` takes
- nothing: ``<run dir>/study.db``, SQLite in WAL mode (one machine, resumable);
- ``postgresql://user:password@host:port/db`` (or ``postgresql+psycopg://``): Optuna's RDB storage on
  a PostgreSQL server through psycopg 3; any number of workers on any machines;
- ``journal:PATH`` or a ``*.log`` path: Optuna's ``JournalStorage`` on a file, for a shared file system
  (NFS); no server, but Optuna 5.1's journal storage has no heartbeats (see below);
- ``sqlite:///PATH`` or any other path: an SQLite file.

Heartbeats (RDB storages only: SQLite and PostgreSQL): each running trial writes a heartbeat every
``heartbeat_s`` seconds; a trial silent for ``3 * heartbeat_s`` (its worker was killed) is marked FAIL
by the next worker that looks, and ``RetryHeartbeatStaleTrialCallback`` (formerly
``RetryFailedTrialCallback``) queues the same parameters again.

Every failure to reach or read the storage becomes one :class:`HwpruneError` line with the URL's
password hidden.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import BaseStorage

from hwprune.errors import HwpruneError

__all__ = ["StudyStore", "StorageKind", "storage_kind", "open_storage", "close_storage", "describe", "STUDY_NAME"]

STUDY_NAME = "hwprune"
StorageKind = Literal["sqlite", "postgresql", "journal"]
_PG_PREFIXES = ("postgresql://", "postgresql+psycopg://", "postgres://")


@dataclass(frozen=True)
class StudyStore:
    """Which study a search joins: ``url`` (None: ``<run dir>/study.db``) and the study ``name``."""

    url: str | None = None
    name: str = STUDY_NAME
    heartbeat_s: int = 10  # RDB storages; a killed worker's trial is retried after 3x this
    fresh: bool = False  # delete the study first (every worker of it loses its trials)

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise HwpruneError("--study must be a non-empty name, e.g. --study minilm-2x")
        if not isinstance(self.heartbeat_s, int) or self.heartbeat_s < 1:
            raise HwpruneError(f"heartbeat must be a whole number of seconds >= 1 (got {self.heartbeat_s!r})")

    def resolved(self, run_dir: Path) -> str:
        return self.url if self.url else str(run_dir / "study.db")


def storage_kind(url: str) -> StorageKind:
    if url.startswith(_PG_PREFIXES):
        return "postgresql"
    if url.startswith("journal:") or url.endswith(".log"):
        return "journal"
    if "://" in url and not url.startswith("sqlite://"):
        raise HwpruneError(
            f"--storage {describe(url)}: unsupported scheme; use postgresql://user:password@host:port/db, "
            "journal:PATH (a shared file) or an SQLite path such as runs/x/study.db"
        )
    return "sqlite"


def describe(url: str) -> str:
    """The URL with its password hidden, for messages and run.json."""
    if "://" not in url or url.startswith("sqlite"):
        return url
    try:
        return sqlalchemy.engine.make_url(_pg_url(url)).render_as_string(hide_password=True)
    except Exception:  # unparsable: keep the scheme, drop user and password
        return url.split("://")[0] + "://***@" + url.split("@")[-1] if "@" in url else url


def _pg_url(url: str) -> str:
    # psycopg 3 is the driver we ship with; SQLAlchemy's bare postgresql:// would want psycopg2.
    for p in ("postgresql://", "postgres://"):
        if url.startswith(p):
            return "postgresql+psycopg://" + url[len(p) :]
    return url


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]  # SQLAlchemy types the DB-API connection as Any-less
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _reason(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e.__cause__ or e
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    text = lines[0] if lines else type(orig).__name__
    # psycopg: 'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused'
    for ln in lines:
        if "password authentication failed" in ln or "does not exist" in ln or "refused" in ln:
            text = ln
            break
    return text.rstrip(".")


def open_storage(url: str, *, heartbeat_s: int | None = 10, create: bool = True) -> BaseStorage:
    """An Optuna storage for ``url``; one HwpruneError line when it cannot be reached or read."""
    kind = storage_kind(url)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:"))
        if not create and not path.is_file():
            raise HwpruneError(f"--storage {url}: no journal file at {path}; check the path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except Exception as e:
            raise HwpruneError(f"--storage {url}: not a readable Optuna journal ({_reason(e)})") from None
    hb: dict[str, object] = {}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat_s is not None:
            hb = dict(
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
    if kind == "sqlite":
        path = Path(url.removeprefix("sqlite:///"))
        if not create and not path.is_file():
            raise HwpruneError(f"--storage {url}: no SQLite file at {path}; check the path or the run directory")
        rdb_url, engine_kwargs = f"sqlite:///{path.resolve()}", {}
    else:
        rdb_url, engine_kwargs = _pg_url(url), {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    last: BaseException | None = None
    # Several workers starting at once may race to create Optuna's tables on a new database: retry.
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url=rdb_url, engine_kwargs=engine_kwargs, **hb)  # type: ignore[arg-type]  # the heartbeat kwargs are typed individually
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            last = e
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.ArgumentError, ValueError) as e:
            raise HwpruneError(
                f"--storage {describe(url)}: not a valid database URL ({_reason(e)}); "
                "expected postgresql://user:password@host:5432/dbname"
            ) from None
        except (sqlalchemy.exc.DatabaseError, sqlalchemy.exc.OperationalError) as e:
            what = "cannot open the SQLite file" if kind == "sqlite" else "cannot connect to PostgreSQL"
            raise HwpruneError(
                f"--storage {describe(url)}: {what} ({_reason(e)}); "
                + (
                    "check the file or start over with --fresh"
                    if kind == "sqlite"
                    else "check the server is running, the host, port, user and password"
                )
            ) from None
        except ImportError:
            raise HwpruneError(
                f"--storage {describe(url)}: PostgreSQL needs the psycopg driver: pip install 'psycopg[binary]' "
                "(or pip install 'hwprune[postgres]')"
            ) from None
        except RuntimeError as e:
            raise HwpruneError(f"--storage {describe(url)}: {_reason(e)}") from None
    else:
        why = _reason(last or Exception())
        raise HwpruneError(f"--storage {describe(url)}: could not create Optuna's tables ({why})")
    if kind == "sqlite":
        # Optuna commits once per suggested parameter; with SQLite's default rollback journal each
        # commit is an fsync (~10 ms here), which made storage 2/3 of a search. WAL + synchronous=NORMAL
        # keeps the file consistent across crashes and power loss (it may lose the last trials only).
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # reopen pooled connections so they get the pragmas
    return storage


def close_storage(storage: BaseStorage) -> None:
    """Release connections (and the SQLite file, so a run directory can be moved or deleted at once)."""
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()
