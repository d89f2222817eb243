"""Feast definitions: entities, feature views and push sources. Definitions only (Feast executes
every .py file in this folder on ``feast apply``). Offline parquet paths are relative to the
store's repo path (``<data_dir>/feast``)."""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Bytes, Float64, Int64, String
from feast.value_type import ValueType

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)
# The published codebook is keyed by its version, so every version stays readable after a newer
# one is published (features/codebook_publish.py; a client decodes with the version of its row).
codebook = Entity(name="codebook", join_keys=["codebook_version"], value_type=ValueType.STRING)
codebook_level = Entity(name="codebook_level", join_keys=["level"], value_type=ValueType.INT64)
codebook_code = Entity(name="codebook_code", join_keys=["code"], value_type=ValueType.INT64)

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

codebook_meta_push = PushSource(
    name="codebook_meta_push",
    batch_source=FileSource(
        name="codebook_meta_offline",
        path="offline/codebook_meta.parquet",
        timestamp_field="event_timestamp",
    ),
)

codebook_meta = FeatureView(
    name="codebook_meta",
    entities=[codebook],
    ttl=timedelta(0),
    schema=[
        Field(name="levels", dtype=Int64),  # L: codes per item
        Field(name="size", dtype=Int64),  # K: centroids per level; code K means "unknown item"
        Field(name="dim", dtype=Int64),  # D: length of a decoded vector
        Field(name="code_bytes", dtype=Int64),  # bytes per packed code (little-endian unsigned)
    ],
    source=codebook_meta_push,
    online=True,
)

codebook_centroids_push = PushSource(
    name="codebook_centroids_push",
    batch_source=FileSource(
        name="codebook_centroids_offline",
        path="offline/codebook_centroids.parquet",
        timestamp_field="event_timestamp",
    ),
)

codebook_centroids = FeatureView(
    name="codebook_centroids",
    entities=[codebook, codebook_level, codebook_code],
    ttl=timedelta(0),
    schema=[
        # scale[level, code] x unit centroid[level, code] (D floats): a packed item decodes to
        # the sum over levels of its codes' vectors; code K (unknown) is published as zeros.
        Field(name="vector", dtype=Array(Float64)),
    ],
    source=codebook_centroids_push,
    online=True,
)
