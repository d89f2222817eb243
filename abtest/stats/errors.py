"""The statistics engine's own error type, so that ``abtest.stats`` imports nothing outside itself.

    StatsError              base of every error the engine raises on purpose
    └── StatsDataError      malformed data: NaN values, mismatched lengths, negative counts

An out-of-range parameter (alpha, power, tau) raises ``ValueError`` instead. Callers that own a
project error hierarchy translate at their boundary (``abtest.readout`` raises
``core.errors.DataError`` from a ``StatsDataError``), as adapters do with library exceptions.
"""

from __future__ import annotations

__all__ = ["StatsDataError", "StatsError"]


class StatsError(Exception):
    """Base of every error the statistics engine raises on purpose."""


class StatsDataError(StatsError):
    """The data handed to the engine is malformed; the message names the input and the fix."""
