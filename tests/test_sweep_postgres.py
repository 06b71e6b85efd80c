"""dynnet-sweep across machines: two commands share one study on a PostgreSQL server the test starts itself."""

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from conftest import SEARCH, best_lines, free_port, sweep_command, sweep_file
from optuna.trial import TrialState


def _server_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on the PATH, or where Debian's postgresql package puts them."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


@pytest.fixture
def postgres():
    """A PostgreSQL server of the test's own on 127.0.0.1, trusting local connections; stopped and removed after."""
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) found; .ci/run installs them")
    # pytest's tmp_path lies in a folder only root can enter; the server runs as the postgres user.
    data = Path(tempfile.mkdtemp(prefix="dynnet-pg-"))
    as_server = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_server = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    pg_ctl = [*as_server, str(binaries / "pg_ctl"), "-D", str(data / "db")]
    try:
        subprocess.run(
            [*as_server, str(binaries / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust"]
            + ["--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        # -F: no fsync, a throwaway server; -k: its socket in its own folder rather than /var/run/postgresql.
        options = f"-h 127.0.0.1 -p {port} -k {data} -F"
        subprocess.run([*pg_ctl, "-l", str(data / "log"), "-w", "-t", "60", "-o", options, "start"], check=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_commands_share_one_study_on_postgres(tmp_path, postgres):
    config = sweep_file(tmp_path / "search.yaml", SEARCH)
    # The server trusts local connections and ignores the password; the commands must never show it.
    url = f"{postgres}?password=qsecret9&application_name=dynnet"
    # Two "machines": the same command with its own root, started together.
    commands = [
        subprocess.Popen(
            sweep_command(str(config), "--workers", "1", "--trials", "8", "--storage", url, "--root", str(root)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for root in (tmp_path / "a", tmp_path / "b")
    ]
    outputs = [command.communicate(timeout=300) for command in commands]
    assert [command.returncode for command in commands] == [0, 0], outputs
    assert not [text for output in outputs for text in output if "secret9" in text]
    for out, _ in outputs:
        assert f"Study search in {postgres}?password=***&application_name=dynnet: " in out
    ran = [int(re.search(r"this command ran (\d+)", out).group(1)) for out, _ in outputs]
    trials = optuna.load_study(study_name="search", storage=postgres).get_trials()
    # Both worked on the study, their trials add up to it, and it reached its total (one more only if both
    # started a last trial at the same moment).
    assert all(n > 0 for n in ran) and sum(ran) == len(trials) and 8 <= len(trials) <= 9
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    for (out, _), root in zip(outputs, ("a", "b")):
        mine = [t for t in trials if t.user_attrs["run"].startswith(str(tmp_path / root))]
        assert len(mine) == int(re.search(r"this command ran (\d+)", out).group(1))
        assert all(Path(t.user_attrs["run"]).is_dir() for t in mine)
        best, _, _ = best_lines(out)
        assert f"{trials[int(best.group(1))].value:.6g}" == best.group(3)
