"""ClickHouse adapter: the client, the schema, inserts and parameterised queries.

The same code talks to a ClickHouse server (``HYMIREC_CLICKHOUSE_DSN=http://host:8123``) or to the
embedded engine (``chdb:///<dir>``, the default): only the DSN differs. Every clickhouse-connect
exception is translated to :class:`~core.errors.AnalyticsError` here. User input (an experiment
name, a variant) reaches SQL only as a bound parameter (``{name:Type}``), never as text.

Deduplication. The sink is at-least-once, so an event can arrive more than once. ``events`` is a
ReplacingMergeTree ordered by ``(event_type, experiment, user_id, event_id)``: copies of an event
share that key (they are identical) and collapse when parts merge. Merges happen at an unknown
time, so every read of ``events`` uses ``FINAL``, which applies the same replacement at query time;
a query is therefore exact right after an insert, before any merge. ``FINAL`` was chosen over
``LIMIT 1 BY event_id`` (a global sort or hash of all rows) and over ``uniqExact(event_id)``
aggregates (which work for counts only, not for sums, minima or joins): it keeps the queries
plain SQL, and it costs a merge of the sorted parts, not a global sort. ``ingested_at`` is the
version column, so the newest copy wins; copies are identical anyway. The event type and the
experiment lead the key so that a readout reads its experiment's impressions, its errors and the
positive events as three key ranges, not every row of the table (schema version 2; version 1 was
ordered by ``(user_id, event_id)`` and ``ensure_schema`` migrates it). The table is deliberately
not partitioned: a monthly partition key makes ClickHouse refuse any insert block that spans more
than 100 months (``max_partitions_per_insert_block``), so one batch of valid but far-apart
timestamps would fail forever and stall the sink; partitions do not speed up these queries.

Two aggregates of the tagged impressions are kept by materialised views on every insert into
``events``: ``exposure_users``, one row per (experiment, user) with the earliest timestamp and the
smallest and largest variant, and ``exposure_requests``, one row per (experiment, user, request
id) with the same and the largest latency. Minima and maxima are the same however many copies of
an impression arrive, so these tables need no deduplication of their own (reads use ``FINAL`` to
combine the partial rows of unmerged parts), and a readout gets its users, their variants, their
distinct requests and each request's latency without grouping millions of impressions by a
request id string.

One process per chdb directory (measured with chdb 4.4.0, clickhouse-connect 1.12.0). The engine
takes an exclusive lock on ``<dir>/status`` (which holds ``PID: n``) while any client in the process
is open. A second *process* cannot open the directory at all, not even to read (chdb's read-only
``mode=ro`` fails the same way): clickhouse-connect raises ``ProgrammingError: ... Error
initializing EmbeddedServer`` and chdb prints "Cannot lock file <dir>/status. Another server
instance in same directory is already running". Once the owner closes its last client, the lock
and the status file go and another process opens the directory normally (about 0.7 s to start the
engine). Within one process, clients on the same directory share the engine, and a client on
another directory fails while one is open. So with ``hymirec sink`` running on chdb, ``hymirec
readout`` in another shell stops with an :class:`AnalyticsError` naming the owner's pid and the
two ways out: stop the sink (SIGTERM: it flushes, commits and frees the directory), or point both
at a ClickHouse server. The PREWHERE-before-FINAL filters in ``abtest.metrics`` are exact for the
same reason the deduplication is: copies differ only in ``ingested_at``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import clickhouse_connect
import pandas as pd
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from core.errors import AnalyticsError
from core.settings_groups import ClickHouseSettings
from streaming.schema import Event

__all__ = [
    "EVENT_COLUMNS",
    "SCHEMA_VERSION",
    "analytics_client",
    "chdb_owner_pid",
    "command",
    "ensure_schema",
    "insert_event_frame",
    "insert_events",
    "load_item_dimension",
    "open_client",
    "query_df",
]

EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "ts_ms",
    "experiment",
    "variant",
    "request_id",
    "model_version",
    "position",
    "value",
    "latency_ms",
    "schema_version",
)
"""The columns an insert supplies, in Event field order; ``ingested_at`` is filled by the table."""

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
"""1: ``events`` ordered by (user_id, event_id). 2: ordered by (event_type, experiment, user_id,
event_id), and the ``exposure_requests`` aggregate kept by a materialised view. 3: the
``exposure_users`` aggregate, kept the same way."""

_EVENTS_KEY = "event_type, experiment, user_id, event_id"

# The events table's columns; ``events_migrating`` (version 1 -> 2) is created with the same.
_EVENTS_COLUMNS = """(
        event_id UUID,
        user_id UInt64,
        item_id Nullable(UInt64),
        event_type LowCardinality(String),
        ts_ms Int64,
        experiment LowCardinality(Nullable(String)),
        variant LowCardinality(Nullable(String)),
        request_id Nullable(String),
        model_version LowCardinality(Nullable(String)),
        position Nullable(UInt16),
        value Nullable(Float64),
        latency_ms Nullable(Float64),
        schema_version UInt8,
        ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
    )"""

_EVENTS_ENGINE = f"""
    ENGINE = ReplacingMergeTree(ingested_at)
    ORDER BY ({_EVENTS_KEY})
    SETTINGS allow_nullable_key = 1
"""

_ITEMS_SCHEMA = """
    CREATE TABLE IF NOT EXISTS items (
        item_id UInt64,
        title String,
        year UInt16,
        genres Array(LowCardinality(String)),
        loaded_at DateTime64(3, 'UTC') DEFAULT now64(3)
    )
    ENGINE = ReplacingMergeTree(loaded_at)
    ORDER BY item_id
"""

# One row per (experiment, user, request id) of the exposures (tagged impressions), with only
# aggregates that a redelivered copy cannot change (min, max): exact under at-least-once without
# a FINAL over the impressions. A NULL request id is a key of its own, as in GROUP BY.
_EXPOSURE_REQUESTS_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS exposure_requests (
        experiment LowCardinality(String),
        user_id UInt64,
        request_id Nullable(String),
        variant_min SimpleAggregateFunction(min, LowCardinality(String)),
        variant_max SimpleAggregateFunction(max, LowCardinality(String)),
        first_ts_ms SimpleAggregateFunction(min, Int64),
        latency_ms SimpleAggregateFunction(max, Nullable(Float64))
    )
    ENGINE = AggregatingMergeTree
    ORDER BY (experiment, user_id, request_id)
    SETTINGS allow_nullable_key = 1
    """,
    """
    CREATE MATERIALIZED VIEW IF NOT EXISTS exposure_requests_mv TO exposure_requests AS
    SELECT
        assumeNotNull(experiment) AS experiment,
        user_id,
        request_id,
        assumeNotNull(variant) AS variant_min,
        assumeNotNull(variant) AS variant_max,
        ts_ms AS first_ts_ms,
        latency_ms
    FROM events
    WHERE event_type = 'impression' AND experiment IS NOT NULL AND variant IS NOT NULL
    """,
)

_SCHEMA_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_version (
        version UInt32,
        applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
    )
    ENGINE = MergeTree
    ORDER BY version
"""

# One row per (experiment, user) of the exposures: the first one and the smallest and largest
# variant, so a readout finds its users and their variant without reading a row per request.
_EXPOSURE_USERS_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS exposure_users (
        experiment LowCardinality(String),
        user_id UInt64,
        variant_min SimpleAggregateFunction(min, LowCardinality(String)),
        variant_max SimpleAggregateFunction(max, LowCardinality(String)),
        first_ts_ms SimpleAggregateFunction(min, Int64)
    )
    ENGINE = AggregatingMergeTree
    ORDER BY (experiment, user_id)
    """,
    """
    CREATE MATERIALIZED VIEW IF NOT EXISTS exposure_users_mv TO exposure_users AS
    SELECT
        assumeNotNull(experiment) AS experiment,
        user_id,
        assumeNotNull(variant) AS variant_min,
        assumeNotNull(variant) AS variant_max,
        ts_ms AS first_ts_ms
    FROM events
    WHERE event_type = 'impression' AND experiment IS NOT NULL AND variant IS NOT NULL
    """,
)

# What each version adds to a directory that had the one before: its aggregates filled from the
# events already stored (the views see only new inserts).
_BACKFILLS: dict[int, str] = {
    2: """
    INSERT INTO exposure_requests
    SELECT
        assumeNotNull(experiment),
        user_id,
        request_id,
        assumeNotNull(variant),
        assumeNotNull(variant),
        ts_ms,
        latency_ms
    FROM events
    WHERE event_type = 'impression' AND experiment IS NOT NULL AND variant IS NOT NULL
    """,
    3: """
    INSERT INTO exposure_users
    SELECT assumeNotNull(experiment), user_id, assumeNotNull(variant), assumeNotNull(variant), ts_ms
    FROM events
    WHERE event_type = 'impression' AND experiment IS NOT NULL AND variant IS NOT NULL
    """,
}


def chdb_owner_pid(dsn: str) -> int | None:
    """The pid of another live process that holds the chdb directory of ``dsn``, if any.

    Reads ``<dir>/status`` (``PID: n``), which the engine writes and locks while it runs and
    removes on a clean close; a leftover file from a killed process names a dead pid and is ignored.
    """
    if not dsn.startswith("chdb:"):
        return None
    status = Path(urlparse(dsn).path) / "status"
    try:
        text = status.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "PID" and value.strip().isdigit():
            pid = int(value.strip())
            if pid == os.getpid():
                return None
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return pid
            return pid
    return None


def open_client(clickhouse: ClickHouseSettings) -> Client:
    """A clickhouse-connect client for ``clickhouse.dsn`` (a server or chdb)."""
    dsn = clickhouse.dsn
    try:
        return clickhouse_connect.get_client(dsn=dsn)
    except (ClickHouseError, OSError) as exc:
        owner = chdb_owner_pid(dsn)
        if owner is not None:
            raise AnalyticsError(
                f"the chdb directory {urlparse(dsn).path} is in use by process {owner} (for "
                "example `hymirec sink`): chdb lets one process open a directory. Stop that "
                "process first, or run a ClickHouse server and point every process at it with "
                "HYMIREC_CLICKHOUSE_DSN=http://HOST:8123"
            ) from exc
        raise AnalyticsError(f"cannot open ClickHouse at {dsn}: {exc}") from exc


@contextlib.contextmanager
def analytics_client(clickhouse: ClickHouseSettings) -> Iterator[Client]:
    """``open_client`` with ``ensure_schema``, closed on exit (which frees a chdb directory)."""
    client = open_client(clickhouse)
    try:
        ensure_schema(client)
        yield client
    finally:
        client.close()


def command(client: Client, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
    """Run a statement that returns nothing; ClickHouse errors become AnalyticsError."""
    try:
        client.command(sql, parameters=dict(parameters or {}))
    except ClickHouseError as exc:
        raise AnalyticsError(f"ClickHouse refused a statement: {exc}") from exc


def query_df(client: Client, sql: str, parameters: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Run a parameterised SELECT and return a DataFrame; errors become AnalyticsError."""
    try:
        frame: pd.DataFrame = client.query_df(sql, parameters=dict(parameters or {}))
    except ClickHouseError as exc:
        raise AnalyticsError(f"ClickHouse refused a query: {exc}") from exc
    return frame


def _sorting_keys(client: Client) -> dict[str, str]:
    """Each table of the current database and its sorting key."""
    frame = query_df(
        client, "SELECT name, sorting_key FROM system.tables WHERE database = currentDatabase()"
    )
    return {} if frame.empty else dict(zip(frame["name"], frame["sorting_key"], strict=True))


def _create_events_table(client: Client, name: Literal["events", "events_next"]) -> None:
    command(client, f"CREATE TABLE IF NOT EXISTS {name} {_EVENTS_COLUMNS} {_EVENTS_ENGINE}")


def _schema_version(client: Client) -> int:
    frame = query_df(client, "SELECT toUInt32(max(version)) AS version FROM schema_version")
    return 0 if frame.empty else int(frame["version"].iloc[0])


def ensure_schema(client: Client) -> None:
    """Create the tables if they are missing and bring an older data directory up to
    ``SCHEMA_VERSION`` (idempotent; each step can be re-run after a crash).

    Version 1 -> 2: the old ``events`` moves aside (``events_migrating``) in the same RENAME that
    puts an empty table with the new order in its place, so the sink keeps inserting; the old rows
    are copied over and the old table dropped. Each later version's aggregate tables and views
    are created, then filled from ``events`` (``_BACKFILLS``), and the version is recorded last:
    rows that both a view and a backfill see (or a backfill run twice) are merged by ``min`` and
    ``max``, which a second copy cannot change.
    """
    command(client, _SCHEMA_VERSION_TABLE)
    command(client, _ITEMS_SCHEMA)
    keys = _sorting_keys(client)
    if keys.get("events", _EVENTS_KEY) != _EVENTS_KEY:
        log.info("ClickHouse: re-ordering events by (%s) (schema version 2)", _EVENTS_KEY)
        _create_events_table(client, "events_next")
        command(client, "RENAME TABLE events TO events_migrating, events_next TO events")
        keys = _sorting_keys(client)
    _create_events_table(client, "events")
    if "events_migrating" in keys:
        command(client, "INSERT INTO events SELECT * FROM events_migrating")
        command(client, "DROP TABLE events_migrating")
    for statement in (*_EXPOSURE_REQUESTS_SCHEMA, *_EXPOSURE_USERS_SCHEMA):
        command(client, statement)
    for version in range(_schema_version(client) + 1, SCHEMA_VERSION + 1):
        if version in _BACKFILLS:
            log.info("ClickHouse: filling the aggregates of schema version %d from events", version)
            command(client, _BACKFILLS[version])
        command(
            client,
            "INSERT INTO schema_version (version) VALUES ({version:UInt32})",
            {"version": version},
        )


def _event_row(event: Event) -> list[Any]:
    return [getattr(event, name) for name in EVENT_COLUMNS]


def insert_events(client: Client, events: Sequence[Event]) -> int:
    """Insert validated events as one block; return the number of rows written."""
    if not events:
        return 0
    try:
        client.insert("events", [_event_row(e) for e in events], column_names=list(EVENT_COLUMNS))
    except ClickHouseError as exc:
        raise AnalyticsError(f"insert of {len(events)} events failed: {exc}") from exc
    return len(events)


def insert_event_frame(client: Client, frame: pd.DataFrame) -> int:
    """Bulk-insert events given as columns (benchmarks, backfills); missing optionals are NULL.

    The frame must hold ``event_id`` (uuid text or UUID), ``user_id``, ``event_type`` and ``ts_ms``;
    it is not validated beyond what the column types enforce, so use ``insert_events`` for input
    that did not come through ``parse_event``.
    """
    required = {"event_id", "user_id", "event_type", "ts_ms"}
    missing = required - set(frame.columns)
    if missing:
        raise AnalyticsError(f"event frame lacks the columns {sorted(missing)}")
    columns = [c for c in EVENT_COLUMNS if c in frame.columns]
    try:
        client.insert_df("events", frame[columns], column_names=columns)
    except ClickHouseError as exc:
        raise AnalyticsError(f"insert of {len(frame)} event rows failed: {exc}") from exc
    return len(frame)


def load_item_dimension(client: Client, items: pd.DataFrame) -> int:
    """Upsert the item dimension (``item_id, title, year, genres``, e.g. MovieLens metadata)."""
    frame = items[["item_id", "title", "year", "genres"]].copy()
    frame["genres"] = [list(g) for g in frame["genres"]]
    try:
        client.insert_df("items", frame, column_names=list(frame.columns))
    except ClickHouseError as exc:
        raise AnalyticsError(f"insert of {len(frame)} items failed: {exc}") from exc
    return len(frame)
