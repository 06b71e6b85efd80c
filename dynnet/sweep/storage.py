"""Where a study lives: its database, opened with Optuna's heartbeat, and its URL written without secrets."""

import contextlib
import re
import time
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from dynnet.errors import one_line
from dynnet.sweep.errors import SweepError

# Tries to open a storage whose tables another command is creating at the same moment, and what the database
# says when it finds them half made.
STORAGE_ATTEMPTS = 5
CREATING_TABLES = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError)
# Keys whose values are secrets or name where secrets are (password, passwd, PWD, sslpassword, passfile, sslkey,
# token), in the query and in a connection string inside the URL.
SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|credential", re.I)
# A connection string inside the URL: ODBC's in a query value (odbc_connect: KEY=value up to the next ;, or
# {value} with } doubled inside), or a libpq conninfo as the database (key=value up to a blank, or 'value' with \'
# inside). Group 2 is a setting's value.
ODBC = re.compile(r"([^;=]+)=\s*(\{(?:[^}]|\}\})*\}?|[^;]*)")
CONNINFO = re.compile(r"([\w.-]+)\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)")
# A URL inside the URL (libpq takes one as the database): its password.
USERINFO = re.compile(r"(://[^:/?#@\s]*:)(.*)@")
URL_FORM = (
    "DIALECT+DRIVER://USER:PASSWORD@HOST:PORT/DATABASE such as sqlite:///runs/sweep/study.db, with a numeric port "
    "and any @ / : ? # in the password written %40 %2F %3A %3F %23"
)


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """The sweep uses Optuna's RDB heartbeat, fail_stale_trials, metric names and TPE's constant liar on purpose:
    their "experimental" warnings would repeat in every worker and say nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def check_url(url: str) -> URL:
    """The storage URL parsed; a malformed one is refused without quoting it (the parser's message can hold part
    of the password: a '/' in it turns the rest into a port, an '@' into a host)."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        parsed = None
    # A host with an @ is the rest of a password with an unencoded @ in it.
    if parsed is None or "@" in (parsed.host or ""):
        raise SweepError(f"storage: not a database URL; expected {URL_FORM}")
    return parsed


def safe_url(url: str) -> str:
    """The storage URL as it may be shown: the password, secret query values and the secrets of connection strings
    inside it (ODBC's odbc_connect, a libpq conninfo or URL as the database) replaced by ***."""
    parsed = check_url(url)
    query = [(key, "***" if SECRET_KEY.search(key) else _masked(value, ODBC)[0]) for key, value in _query(parsed)]
    bare = URL.create(parsed.drivername, parsed.username, parsed.password, parsed.host, parsed.port)
    shown = bare.render_as_string(hide_password=True)
    if parsed.database is not None:
        shown += f"/{_masked(parsed.database, CONNINFO)[0]}"
    return f"{shown}?{urlencode(query, safe='*/')}" if query else shown


def scrub(text: str, url: str) -> str:
    """text without the URL's secrets, in any of the forms a message may quote them (a driver's error can)."""
    parsed = check_url(url)
    secrets = [parsed.password or "", *_masked(parsed.database or "", CONNINFO)[1]]
    for key, value in _query(parsed):
        secrets += [value] if SECRET_KEY.search(key) else _masked(value, ODBC)[1]
    # As the driver reads a quoted value: without its quotes, a doubled } or an escaped ' as one.
    secrets += [s[1:-1].replace("}}", "}").replace("\\'", "'") for s in secrets if s[:1] + s[-1:] in ("{}", "''")]
    forms = {form for secret in secrets if secret for form in (secret, quote(secret, safe=""), quote_plus(secret))}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def _query(parsed: URL) -> list[tuple[str, str]]:
    return [(k, v) for k, values in parsed.query.items() for v in ((values,) if isinstance(values, str) else values)]


def _masked(text: str, settings: re.Pattern) -> tuple[str, list[str]]:
    """A connection string (its settings' form: ODBC or CONNINFO) with its secrets replaced by ***, and those
    secrets."""
    secrets: list[str] = []

    def mask(found: re.Match, key: str) -> str:
        if not SECRET_KEY.search(key) or not found[2]:
            return found[0]
        secrets.append(found[2])
        return found[0][: found.start(2) - found.start()] + "***" + found[0][found.end(2) - found.start() :]

    text = settings.sub(lambda found: mask(found, found[1]), text)
    return USERINFO.sub(lambda found: mask(found, "password"), text), secrets


@contextlib.contextmanager
def storage_errors(url: str, what: str) -> Iterator[None]:
    """A database error as one line naming the storage and what failed, without the URL's secrets (a driver's
    message can quote them)."""
    try:
        yield
    except SweepError:
        raise
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ValueError, OSError) as err:
        cause = err.__cause__ if isinstance(err, optuna.exceptions.StorageInternalError) and err.__cause__ else err
        reason = getattr(cause, "orig", None) or cause
        # Scrubbed before one_line shortens it, which could cut a secret to a part that no longer matches.
        reason = one_line(RuntimeError(scrub(str(reason), url)))
        raise SweepError(f"storage {safe_url(url)} {what}: {reason}") from None


def open_storage(url: str, heartbeat_interval: int, grace_period: int) -> optuna.storages.RDBStorage:
    """The study's database. Its heartbeat settings make a worker's storage beat for each trial it runs, and let
    any process (a worker, the sweep's own) fail the running trials whose heartbeat stopped."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a long-lived worker survives a server restart
    if url.startswith("sqlite"):
        # Workers write to one SQLite file; waiting up to a minute for its lock beats failing a trial on it.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        with storage_errors(url, "cannot be opened"):
            for attempt in range(STORAGE_ATTEMPTS):
                try:
                    with experimental_ok():
                        return optuna.storages.RDBStorage(
                            url,
                            engine_kwargs=engine_kwargs,
                            heartbeat_interval=heartbeat_interval,
                            grace_period=grace_period,
                        )
                except CREATING_TABLES as err:
                    # Two commands started together both create the study tables; the second finds them half
                    # made (SQLite says so with an OperationalError, which otherwise means the database cannot be
                    # reached).
                    half_made = not isinstance(err, sqlalchemy.exc.OperationalError) or "already exists" in str(err)
                    if attempt == STORAGE_ATTEMPTS - 1 or not half_made:
                        raise
                    time.sleep(1)
    except ImportError as err:  # Optuna wraps the driver's ModuleNotFoundError
        driver = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "module"
        hint = ": pip install 'dynnet[postgres]'" if url.startswith("postgresql") else ""
        raise SweepError(f"storage {safe_url(url)}: its database driver {driver} is not installed{hint}") from None
