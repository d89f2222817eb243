"""`hymirec dashboard` binds the address the settings name (HYMIREC_DASHBOARD_HOST).

In a container it must bind 0.0.0.0 for the published port to answer; here a second loopback
address (127.0.0.2) shows the setting reaches Streamlit: the health endpoint answers there and
127.0.0.1 on the same port refuses the connection.
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from core.settings import Settings
from hymirec.processes import ServiceProcess
from tests.conftest import free_port, wait_until

HOST = "127.0.0.2"


def healthy(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/_stcore/health", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.integration
def test_the_dashboard_binds_the_configured_address(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, dashboard_host=HOST, dashboard_port=free_port(), serve_port=free_port()
    )
    with ServiceProcess("dashboard", ["dashboard"], settings) as dashboard:
        port = settings.dashboard.port
        wait_until(
            lambda: healthy(HOST, port) or not dashboard.alive(), 120, "the dashboard on 127.0.0.2"
        )
        assert dashboard.alive(), dashboard.tail()
        assert healthy(HOST, port)
        assert refused("127.0.0.1", port)
        assert f"dashboard on http://{HOST}:{port}" in dashboard.tail()
        assert dashboard.stop() == 0


def test_the_default_is_loopback_only() -> None:
    assert Settings().dashboard.host == "127.0.0.1"
