"""`esper watch --once` is a cron check (`... || page-someone`): a bus that does not answer is
exit 1 with one line naming it, never "0 events, 0 alerts firing" and exit 0. The real CLI app, a
real port nobody listens on, a real workspace."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from esper.oona import embedded_running
from esper.urza import Urza
from esper_cli.main import app


def free_port() -> int:
    with socket.socket() as s:  # bound, then released: nobody listens on it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("json_output", [False, True])
def test_an_unreachable_redis_fails_the_check_in_one_line(workspace, json_output):
    url = f"redis://watcher:hunter2@127.0.0.1:{free_port()}"
    args = ["--workspace", str(workspace.root), "--redis-url", url, *(["--json"] * json_output),
            "watch", "--once"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: the bus at {url.replace('hunter2', '***')} could not be read")
    assert "hunter2" not in result.stderr
    assert result.stdout == ""  # no "0 events, 0 runs, 0 alerts firing"


def test_no_embedded_bus_running_is_nothing_to_read_and_starts_none(workspace):
    """Not a blind check: nothing publishes without the embedded bus (whoever does starts it), and
    the catalog's alerts are still evaluated (test_nissa_alerts.py)."""
    Urza.open(workspace).close()
    result = CliRunner().invoke(app, ["--workspace", str(workspace.root), "watch", "--once"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == "0 events, 0 runs, 0 alerts firing\n" and result.stderr == ""
    assert not embedded_running(workspace)
