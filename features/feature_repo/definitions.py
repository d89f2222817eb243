"""Feast definitions: entities, feature views and push sources. Definitions only (Feast executes
every .py file in this folder on ``feast apply``). Offline parquet paths are relative to the
store's repo path (``<data_dir>/feast``)."""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Bytes, Int64, String
from feast.value_type import ValueType

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)

user_history_push = PushSource(
    name="user_history_push",
    batch_source=FileSource(
        name="user_history_offline",
        path="offline/user_history.parquet",
        timestamp_field="event_timestamp",
    ),
)

user_history = FeatureView(
    name="user_history",
    entities=[user],
    ttl=timedelta(0),  # never expires: a history is valid until replaced
    schema=[
        Field(name="recent_item_ids", dtype=Array(Int64)),  # last R items, oldest first
        Field(name="long_codes", dtype=Bytes),  # last P items' codebook codes, packed
        Field(name="history_len", dtype=Int64),  # positive events seen in all
        Field(name="last_ts_ms", dtype=Int64),
        Field(name="last_offset", dtype=Int64),  # source offset of the newest event included
        Field(name="codebook_version", dtype=String),
    ],
    source=user_history_push,
    online=True,
)

item_codebook_push = PushSource(
    name="item_codebook_push",
    batch_source=FileSource(
        name="item_codebook_offline",
        path="offline/item_codebook.parquet",
        timestamp_field="event_timestamp",
    ),
)

item_codebook = FeatureView(
    name="item_codebook",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="codes", dtype=Bytes),  # one code per level, packed
        Field(name="codebook_version", dtype=String),
    ],
    source=item_codebook_push,
    online=True,
)

item_metadata_push = PushSource(
    name="item_metadata_push",
    batch_source=FileSource(
        name="item_metadata_offline",
        path="offline/item_metadata.parquet",
        timestamp_field="event_timestamp",
    ),
)

item_metadata = FeatureView(
    name="item_metadata",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="title", dtype=String),
        Field(name="year", dtype=Int64),
        Field(name="genres", dtype=Array(String)),
    ],
    source=item_metadata_push,
    online=True,
)
