"""The shared test harness's servers (openhtc.testing.server): what the fixtures leave behind."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from openhtc.testing.server import HtcServer


@pytest.mark.one_db
def test_a_fixture_stops_its_server_without_waiting_and_reap_leaves_none_running(
    start_server: Callable[..., HtcServer],
) -> None:
    """The fixtures' teardown sends SIGTERM and moves on (the next test need not wait for the
    shutdown); ``HtcServer.reap`` (at the session's end, before PostgreSQL stops) waits for it."""
    srv = start_server()
    assert srv.proc is not None
    proc = srv.proc
    srv.stop(wait=False)
    assert srv not in HtcServer.live
    assert proc in HtcServer.exiting or proc.poll() is not None
    HtcServer.reap()
    assert proc.poll() is not None and proc not in HtcServer.exiting
    assert "openhtc stopped" in srv.log_tail(20)  # a graceful stop, not a kill
