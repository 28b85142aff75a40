"""`make demo` run twice within a minute: examples/demo.sh's port check must not call a port
"in use" because of the previous run's connections in TIME_WAIT (the server binds with
SO_REUSEADDR, so the check does too), and must still see a port someone listens on."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.one_db

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.sh"


def port_check() -> str:
    """The Python program of demo.sh's port_free function (its here-document)."""
    found = re.search(r"port_free\(\) \{\n.*?<<'EOF'\n(.*?)\nEOF\n", DEMO.read_text(), re.S)
    assert found, "port_free() not found in examples/demo.sh"
    return found.group(1)


def free(port: int) -> bool:
    result = subprocess.run([sys.executable, "-", str(port)], input=port_check(), text=True, check=False)
    return result.returncode == 0


def test_a_port_in_time_wait_is_free_and_a_listened_port_is_not() -> None:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        assert not free(port)  # listening: in use
        accepted.close()  # the server's side closes first: its end stays in TIME_WAIT
        client.close()
    assert free(port)  # as after a demo server stopped: only TIME_WAIT is left
