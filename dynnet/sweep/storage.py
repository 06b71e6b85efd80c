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
# Query keys whose values are secrets or name where secrets are (password, sslpassword, passfile, sslkey, token).
SECRET_KEY = re.compile(r"pass|secret|token|key|credential", re.I)
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
    """The storage URL as it may be shown: the password and secret query values replaced by ***."""
    parsed = check_url(url)
    query = [
        (key, "***" if SECRET_KEY.search(key) else value)
        for key, values in parsed.query.items()
        for value in ((values,) if isinstance(values, str) else values)
    ]
    shown = parsed.set(query={}).render_as_string(hide_password=True)
    return f"{shown}?{urlencode(query, safe='*/')}" if query else shown


def scrub(text: str, url: str) -> str:
    """text without the URL's secrets, in any of the forms a message may quote them (a driver's error can)."""
    parsed = check_url(url)
    secrets = [parsed.password or ""]
    for key, value in parsed.query.items():
        if SECRET_KEY.search(key):
            secrets += [value] if isinstance(value, str) else list(value)
    forms = {form for secret in secrets if secret for form in (secret, quote(secret, safe=""), quote_plus(secret))}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def open_storage(url: str, heartbeat_interval: int, grace_period: int) -> optuna.storages.RDBStorage:
    """The study's database. Its heartbeat settings make a worker's storage beat for each trial it runs, and let
    any process (a worker, the sweep's own) fail the running trials whose heartbeat stopped."""
    shown = safe_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a long-lived worker survives a server restart
    if url.startswith("sqlite"):
        # Workers write to one SQLite file; waiting up to a minute for its lock beats failing a trial on it.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
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
                # Two commands started together both create the study tables; the second finds them half made
                # (SQLite says so with an OperationalError, which otherwise means the database cannot be reached).
                half_made = not isinstance(err, sqlalchemy.exc.OperationalError) or "already exists" in str(err)
                if attempt == STORAGE_ATTEMPTS - 1 or not half_made:
                    raise
                time.sleep(1)
    except ImportError as err:  # Optuna wraps the driver's ModuleNotFoundError
        driver = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "module"
        hint = ": pip install 'dynnet[postgres]'" if url.startswith("postgresql") else ""
        raise SweepError(f"storage {shown}: its database driver {driver} is not installed{hint}") from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, OSError) as err:
        reason = getattr(err, "orig", None) or err
        # Scrubbed before one_line shortens it, which could cut a secret to a part that no longer matches.
        reason = one_line(RuntimeError(scrub(str(reason), url)))
        raise SweepError(f"storage {shown} cannot be opened: {reason}") from None
