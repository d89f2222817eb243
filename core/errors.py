"""The project's one exception hierarchy.

    HymirecError
    ├── ConfigError            settings or a config file is invalid
    │   └── ExperimentConfigError  the experiments file is invalid, or a splitter call names an
    │                              unknown experiment or passes a bad user id
    ├── DataError              a data set is missing or malformed
    ├── InvalidEvent           an event failed parsing or validation (carries the reason)
    ├── BrokerError            the Kafka-protocol broker cannot be started, reached or used
    ├── FeatureStoreError      Feast refused a read, write or apply
    ├── AnalyticsError         ClickHouse (server or chdb) refused a connection, query or insert
    ├── CodebookError          a codebook is not fitted, or codes/embeddings have the wrong shape
    ├── TrainerError           the online trainer cannot run (registry owned, topic missing, ...)
    └── SimulatorError         the user simulator got an item it does not know, or cannot use
                               the recommendation service (unreachable, unreadable answers)

Adapters translate library exceptions at the boundary (``raise BrokerError(...) from exc``), so the
core never sees a kafka, feast or clickhouse exception type.
"""

from __future__ import annotations

__all__ = [
    "AnalyticsError",
    "BrokerError",
    "CodebookError",
    "ConfigError",
    "DataError",
    "ExperimentConfigError",
    "FeatureStoreError",
    "HymirecError",
    "InvalidEvent",
    "SimulatorError",
    "TrainerError",
]


class HymirecError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(HymirecError):
    """Settings or a configuration file is invalid; the message names the field and the fix."""


class ExperimentConfigError(ConfigError):
    """The experiments file is invalid (the message names the field and the fix), or a splitter
    call names an unknown experiment or passes a user id outside [0, 2**63 - 1]."""


class DataError(HymirecError):
    """A data set is missing or malformed."""


class InvalidEvent(HymirecError):
    """An event could not be parsed or failed validation.

    ``reason`` is a short machine-readable code (``malformed_json``, ``validation``,
    ``too_large``, ...) and the message says what was wrong, for the dead-letter record.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class BrokerError(HymirecError):
    """The Kafka-protocol broker cannot be started, reached or used."""


class FeatureStoreError(HymirecError):
    """Feast refused a read, write or apply."""


class AnalyticsError(HymirecError):
    """ClickHouse (a server or the embedded chdb) refused a connection, query or insert."""


class CodebookError(HymirecError):
    """A codebook is not fitted, or codes/embeddings have the wrong shape."""


class TrainerError(HymirecError):
    """The online trainer cannot run: the registry is owned by another trainer, or its input
    topic or checkpoints are unusable."""


class SimulatorError(HymirecError):
    """The closed-loop user simulator was given an item it does not know, or cannot use the
    recommendation service (unreachable past the start-up deadline)."""
