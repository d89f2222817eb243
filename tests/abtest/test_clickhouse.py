"""The ClickHouse adapter on a real chdb engine in a temp directory.

The schema, deduplication before any merge, error translation, and what happens when a second
process opens a chdb directory that another process holds (the engine locks it).
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from abtest.clickhouse import (
    EVENT_COLUMNS,
    SCHEMA_VERSION,
    analytics_client,
    chdb_owner_pid,
    command,
    ensure_schema,
    insert_events,
    open_client,
    query_df,
)
from hymirec.cli import main
from hymirec.errors import AnalyticsError
from hymirec.settings import Settings
from streaming.schema import Event
from tests.conftest import free_port


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with analytics_client(settings) as opened:
        yield opened


def scalar(client: Client, sql: str) -> int:
    return int(query_df(client, sql).iloc[0, 0])


def some_events(n: int) -> list[Event]:
    return [
        Event(
            event_id=uuid.uuid4(),
            user_id=i % 3,
            item_id=i,
            event_type="click",
            ts_ms=1_000 + i,
        )
        for i in range(n)
    ]


def test_schema_is_idempotent_and_keyed_for_deduplication(client: Client) -> None:
    ensure_schema(client)  # a second time: no error, nothing changes
    ensure_schema(client)
    columns = query_df(
        client,
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'events' "
        "ORDER BY position",
    )["name"].tolist()
    assert columns == [*EVENT_COLUMNS, "ingested_at"]
    tables = query_df(
        client,
        "SELECT name, engine, sorting_key FROM system.tables "
        "WHERE database = currentDatabase() ORDER BY name",
    )
    events_key = "event_type, experiment, user_id, event_id"  # the copies of an event share it
    assert tables.to_dict("records") == [
        {"name": "events", "engine": "ReplacingMergeTree", "sorting_key": events_key},
        {
            "name": "exposure_requests",
            "engine": "AggregatingMergeTree",
            "sorting_key": "experiment, user_id, request_id",
        },
        {"name": "exposure_requests_mv", "engine": "MaterializedView", "sorting_key": ""},
        {"name": "items", "engine": "ReplacingMergeTree", "sorting_key": "item_id"},
        {"name": "schema_version", "engine": "MergeTree", "sorting_key": "version"},
    ]
    assert scalar(client, "SELECT max(version) FROM schema_version") == SCHEMA_VERSION == 2


def test_redelivered_events_count_once_before_any_merge(client: Client) -> None:
    command(client, "SYSTEM STOP MERGES events")  # so that the copies stay in separate parts
    events = some_events(50)
    assert insert_events(client, events) == 50
    assert insert_events(client, events[:20]) == 20  # a redelivered batch
    assert insert_events(client, events[10:30]) == 20
    parts = scalar(client, "SELECT count() FROM system.parts WHERE table = 'events' AND active")
    assert parts == 3  # three inserts, no merge yet: the copies are still stored
    assert scalar(client, "SELECT count() FROM events") == 90
    assert scalar(client, "SELECT count() FROM events FINAL") == 50
    assert scalar(client, "SELECT uniqExact(event_id) FROM events") == 50


def test_clickhouse_errors_become_analytics_errors(client: Client, tmp_path: Path) -> None:
    with pytest.raises(AnalyticsError, match="refused a query"):
        query_df(client, "SELECT no_such_column FROM events")
    with pytest.raises(AnalyticsError, match=r"UNKNOWN_TABLE|does not exist"):
        query_df(client, "SELECT * FROM no_such_table")


def test_an_unreachable_server_is_an_analytics_error(tmp_path: Path) -> None:
    dsn = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AnalyticsError, match=re.escape(f"cannot open ClickHouse at {dsn}")):
        open_client(Settings(data_dir=tmp_path, clickhouse_dsn=dsn))


HOLDER = """
import sys, clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
client.close()
"""


def test_a_chdb_directory_held_by_another_process_gives_a_clear_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with analytics_client(settings):
        pass  # create the directory and schema, then let go of it
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, settings.clickhouse_dsn],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert chdb_owner_pid(settings.clickhouse_dsn) == holder.pid
        with pytest.raises(AnalyticsError) as raised:
            open_client(settings)
        message = str(raised.value)
        assert f"in use by process {holder.pid}" in message
        assert "HYMIREC_CLICKHOUSE_DSN=http://" in message

        # The CLI reports the same error and exits with status 2 instead of a traceback.
        monkeypatch.setenv("HYMIREC_DATA_DIR", str(settings.data_dir))
        assert main(["readout", "any-experiment"]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0

    # Once the owner has closed its client, this process opens the directory normally.
    assert chdb_owner_pid(settings.clickhouse_dsn) is None
    with analytics_client(settings) as client:
        assert scalar(client, "SELECT count() FROM events") == 0


def test_owner_pid_is_none_for_servers_and_for_a_dead_owner(tmp_path: Path) -> None:
    assert chdb_owner_pid("http://localhost:8123") is None
    directory = tmp_path / "ch"
    directory.mkdir()
    (directory / "status").write_text("PID: 999999999\nStarted at: then\n")  # no such process
    assert chdb_owner_pid(f"chdb:///{directory}") is None
