"""The event schema: one definition, validated on the way in (DESIGN.md, "Interfaces").

Events travel as UTF-8 JSON. ``parse_event`` turns raw bytes into an :class:`Event` or raises
:class:`~core.errors.InvalidEvent` with a reason code and a message naming the field, which the
worker writes to the dead-letter topic beside the original bytes.

A served list travels as one ``exposure`` event per request and experiment layer (its items in
``item_ids``, best first), not one record per item; it stands for one ``impression`` per item
(:func:`exposure_impressions`), which is what the ClickHouse sink stores.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import InvalidEvent

__all__ = [
    "POSITIVE_EVENT_TYPES",
    "SCHEMA_VERSION",
    "Event",
    "EventType",
    "TrainingSample",
    "exposure_impressions",
    "parse_event",
]

SCHEMA_VERSION: Literal[1] = 1

EventType = Literal["impression", "click", "play", "rating", "error", "exposure"]
# ``impression``: an item shown to the user (one per item of a served list, with its position,
# request id, experiment, variant, model version and the request's latency); ``exposure``: a whole
# served list in one record (``item_ids`` instead of ``item_id`` and ``position``; the service
# writes these); ``error``: a recommendation request that failed (no item). The others say the
# user consumed the item: they enter the history and make a training sample.
POSITIVE_EVENT_TYPES: frozenset[str] = frozenset({"click", "play", "rating"})

_MAX_ID = 2**63 - 1
_MAX_LIST = 10_000  # items of one exposure, and the largest position


class Event(BaseModel):
    """One user-item event. ``ts_ms`` is the event time in epoch milliseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: uuid.UUID
    user_id: int = Field(ge=0, le=_MAX_ID)
    item_id: int | None = Field(default=None, ge=0, le=_MAX_ID)
    event_type: EventType
    ts_ms: int = Field(ge=0, le=_MAX_ID)
    experiment: str | None = Field(default=None, min_length=1, max_length=128)
    variant: str | None = Field(default=None, min_length=1, max_length=128)
    request_id: str | None = Field(default=None, min_length=1, max_length=128)
    model_version: str | None = Field(default=None, min_length=1, max_length=128)
    position: int | None = Field(default=None, ge=0, le=_MAX_LIST)
    value: float | None = Field(default=None, allow_inf_nan=False)
    latency_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    item_ids: list[Annotated[int, Field(ge=0, le=_MAX_ID)]] | None = Field(
        default=None, min_length=1, max_length=_MAX_LIST
    )

    @model_validator(mode="after")
    def _item_unless_error(self) -> Event:
        if self.event_type == "exposure":
            if self.item_ids is None or self.item_id is not None or self.position is not None:
                raise ValueError(
                    "an exposure event carries its list in item_ids (best first), without "
                    "item_id or position"
                )
        elif self.item_ids is not None:
            raise ValueError(f"item_ids is only for exposure events, not {self.event_type}")
        elif self.event_type != "error" and self.item_id is None:
            raise ValueError(f"item_id is required for a {self.event_type} event")
        return self

    @field_validator("event_id", mode="before")
    @classmethod
    def _uuid_from_text(cls, value: Any) -> Any:
        # JSON carries the uuid as text; strict mode would refuse a str otherwise.
        if isinstance(value, str):
            try:
                return uuid.UUID(value)
            except ValueError as exc:
                raise ValueError("must be a UUID string such as '1b4e28ba-2fa1-...'") from exc
        return value

    @property
    def is_positive(self) -> bool:
        return self.event_type in POSITIVE_EVENT_TYPES

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def exposure_impressions(exposure: Event) -> list[Event]:
    """The impressions an ``exposure`` stands for: one per item, ``position`` its 0-based index,
    everything else copied. Each ``event_id`` is derived from the exposure's (uuid5 of it and the
    position), so a redelivered exposure gives the same impression ids."""
    if exposure.event_type != "exposure" or exposure.item_ids is None:
        raise ValueError(f"not an exposure event: {exposure.event_type}")
    return [
        exposure.model_copy(
            update={
                "event_id": uuid.uuid5(exposure.event_id, str(position)),
                "event_type": "impression",
                "item_id": item,
                "position": position,
                "item_ids": None,
            }
        )
        for position, item in enumerate(exposure.item_ids)
    ]


class TrainingSample(BaseModel):
    """One positive event with the user's recent items before it (the trainer's input).

    ``seq`` is the 0-based position of this item in the user's history, so a consumer can
    detect gaps or repeats; ``recent_item_ids`` are the up-to-R items consumed before it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: uuid.UUID
    user_id: int
    item_id: int
    event_type: EventType
    ts_ms: int
    seq: int
    recent_item_ids: list[int]
    value: float | None = None
    # When the source event entered Kafka (its record timestamp, ms): the trainer measures
    # event-to-model freshness from it. Optional, so samples from older workers still parse.
    ingest_ts_ms: int | None = None


def parse_event(raw: bytes | bytearray | memoryview | None, max_bytes: int) -> Event:
    """Parse and validate one raw event; raise ``InvalidEvent`` with a reason otherwise."""
    if raw is None:
        raise InvalidEvent("empty", "the record has no value (tombstone or null payload)")
    size = len(raw)
    if size > max_bytes:
        raise InvalidEvent("too_large", f"payload is {size} bytes; the limit is {max_bytes}")
    try:
        payload = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent("malformed_json", f"not UTF-8 JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidEvent("validation", f"expected a JSON object, got {type(payload).__name__}")
    try:
        return Event.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<event>'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise InvalidEvent("validation", problems) from exc
