"""The ClickHouse adapter on a real chdb engine in a temp directory.

The schema, deduplication before any merge, error translation, what happens when a second
process opens a chdb directory that another process holds (the engine locks it), and the
migration of a version-1 directory (also when interrupted): every row kept, the same readout.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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
    load_item_dimension,
    open_client,
    query_df,
)
from abtest.metrics import user_metrics
from core.errors import AnalyticsError
from core.settings import Settings
from hymirec.cli import main
from streaming.schema import Event
from tests.abtest.test_metrics import (
    EXP,
    PRE_DAYS,
    assert_frame_matches_version_1,
    insert_with_redeliveries,
    random_events,
    random_items,
)
from tests.abtest.version1 import VERSION_1_SCHEMA, version_1_user_metrics
from tests.conftest import free_port


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with analytics_client(settings.clickhouse) as opened:
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
        {
            "name": "exposure_users",
            "engine": "AggregatingMergeTree",
            "sorting_key": "experiment, user_id",
        },
        {"name": "exposure_users_mv", "engine": "MaterializedView", "sorting_key": ""},
        {"name": "items", "engine": "ReplacingMergeTree", "sorting_key": "item_id"},
        {"name": "schema_version", "engine": "MergeTree", "sorting_key": "version"},
    ]
    assert scalar(client, "SELECT max(version) FROM schema_version") == SCHEMA_VERSION == 3


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
        open_client(Settings(data_dir=tmp_path, clickhouse_dsn=dsn).clickhouse)


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
    with analytics_client(settings.clickhouse):
        pass  # create the directory and schema, then let go of it
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, settings.clickhouse.dsn],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert chdb_owner_pid(settings.clickhouse.dsn) == holder.pid
        with pytest.raises(AnalyticsError) as raised:
            open_client(settings.clickhouse)
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
    assert chdb_owner_pid(settings.clickhouse.dsn) is None
    with analytics_client(settings.clickhouse) as client:
        assert scalar(client, "SELECT count() FROM events") == 0


def test_owner_pid_is_none_for_servers_and_for_a_dead_owner(tmp_path: Path) -> None:
    assert chdb_owner_pid("http://localhost:8123") is None
    directory = tmp_path / "ch"
    directory.mkdir()
    (directory / "status").write_text("PID: 999999999\nStarted at: then\n")  # no such process
    assert chdb_owner_pid(f"chdb:///{directory}") is None


def version_1_directory(client: Client, seed: int) -> np.random.Generator:
    """The tables as the version-1 code created them, with events redelivered across parts."""
    for statement in VERSION_1_SCHEMA:
        command(client, statement)
    command(client, "SYSTEM STOP MERGES events")
    rng = np.random.default_rng(seed)
    load_item_dimension(client, random_items(rng))
    insert_with_redeliveries(client, rng, random_events(rng, users=80))
    return rng


def tables(client: Client) -> dict[str, str]:
    """The tables of the database and their sorting keys."""
    frame = query_df(
        client, "SELECT name, sorting_key FROM system.tables WHERE database = currentDatabase()"
    )
    return dict(zip(frame["name"], frame["sorting_key"], strict=True))


def stored(client: Client) -> list[tuple[str, str, int]]:
    """Every distinct event (id, type, time), sorted: what the migration must keep."""
    frame = query_df(
        client,
        "SELECT toString(event_id) AS id, toString(event_type) AS kind, ts_ms FROM events FINAL "
        "ORDER BY id",
    )
    return list(frame.itertuples(index=False, name=None))


def assert_reads_out_as_version_1(client: Client) -> None:
    reference, excluded = version_1_user_metrics(client, EXP, pre_days=PRE_DAYS)
    metrics = user_metrics(client, EXP, pre_days=PRE_DAYS)
    assert metrics.excluded_users == excluded
    assert_frame_matches_version_1(metrics.users, reference)


def test_a_version_1_directory_is_migrated_and_reads_out_the_same(settings: Settings) -> None:
    client = open_client(
        settings.clickhouse
    )  # no ensure_schema: the directory as version 1 left it
    try:
        rng = version_1_directory(client, seed=3)
        before = stored(client)
        reference, excluded = version_1_user_metrics(client, EXP, pre_days=PRE_DAYS)
        ensure_schema(client)
        assert scalar(client, "SELECT max(version) FROM schema_version") == SCHEMA_VERSION
        assert tables(client) == {
            "events": "event_type, experiment, user_id, event_id",
            "exposure_requests": "experiment, user_id, request_id",
            "exposure_requests_mv": "",
            "exposure_users": "experiment, user_id",
            "exposure_users_mv": "",
            "items": "item_id",
            "schema_version": "version",
        }
        assert stored(client) == before  # every event kept (copies in one insert collapse)
        metrics = user_metrics(client, EXP, pre_days=PRE_DAYS)
        assert metrics.excluded_users == excluded
        assert_frame_matches_version_1(metrics.users, reference)

        ensure_schema(client)  # up to date: nothing happens
        assert stored(client) == before
        # New events after the migration reach exposure_requests through the view.
        insert_with_redeliveries(client, rng, random_events(rng, users=40, first_user=1000))
        assert_reads_out_as_version_1(client)
    finally:
        client.close()


def test_a_migration_interrupted_after_the_rename_is_completed(settings: Settings) -> None:
    client = open_client(settings.clickhouse)
    try:
        version_1_directory(client, seed=4)
        before = stored(client)
        # As if the process died right after moving the old table aside.
        command(client, "RENAME TABLE events TO events_migrating")
        ensure_schema(client)
        assert stored(client) == before
        assert "events_migrating" not in tables(client)
        assert_reads_out_as_version_1(client)
    finally:
        client.close()


def test_an_interrupted_backfill_runs_again_and_changes_no_number(client: Client) -> None:
    command(client, "SYSTEM STOP MERGES exposure_requests")
    command(client, "SYSTEM STOP MERGES exposure_users")
    rng = np.random.default_rng(5)
    load_item_dimension(client, random_items(rng))
    insert_with_redeliveries(client, rng, random_events(rng, users=80))
    assert_reads_out_as_version_1(client)
    # The version mark is written last: without it the backfill runs again, over rows the view
    # already wrote (a second copy of every request changes no minimum or maximum) ...
    command(client, "TRUNCATE TABLE schema_version")
    ensure_schema(client)
    assert_reads_out_as_version_1(client)
    # ... and over empty tables, as if the process died before the backfills ...
    command(client, "TRUNCATE TABLE schema_version")
    command(client, "TRUNCATE TABLE exposure_requests")
    command(client, "TRUNCATE TABLE exposure_users")
    ensure_schema(client)
    assert_reads_out_as_version_1(client)
    # ... or a version-2 directory, which has no exposure_users yet.
    command(client, "TRUNCATE TABLE schema_version")
    command(client, "INSERT INTO schema_version (version) VALUES (1), (2)")
    command(client, "DROP TABLE exposure_users_mv")
    command(client, "DROP TABLE exposure_users")
    ensure_schema(client)
    assert scalar(client, "SELECT max(version) FROM schema_version") == SCHEMA_VERSION
    assert_reads_out_as_version_1(client)
