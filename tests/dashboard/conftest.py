"""Synthetic experiments in a real chdb directory, published as readout snapshots.

Two experiments with a known truth, written as events into chdb and read out by the publisher:

- ``ranker-broken``: a splitter bug sends exactly 52 % of its 12,000 users to the treatment
  (χ² = 19.2, p ≈ 1e-5: an SRM); the treatment lifts conversion from 20 % to 24 % and is
  30 % slower (a latency guardrail breach);
- ``ranker-balanced``: a fair coin over 4,000 users, the same conversion lift, equal latency.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from abtest.clickhouse import analytics_client, insert_event_frame, load_item_dimension
from abtest.publish import PublishReport, publish_readouts
from abtest.readout import Readout, experiment_readout
from core.settings import Settings

DAY_MS = 86_400_000
T0_MS = 1_700_000_000_000
ITEMS = 40
GENRES = ["Drama", "Comedy", "Sci-Fi", "Romance", "War", "Horror"]
BROKEN, BALANCED = "ranker-broken", "ranker-balanced"
CONVERSION = {"control": 0.20, "treatment": 0.24}
TRUE_CONVERSION_LIFT = CONVERSION["treatment"] - CONVERSION["control"]


def uuid_texts(rng: np.random.Generator, n: int) -> list[str]:
    hx = rng.bytes(16 * n).hex()
    return [
        f"{hx[i : i + 8]}-{hx[i + 8 : i + 12]}-{hx[i + 12 : i + 16]}-{hx[i + 16 : i + 20]}-"
        f"{hx[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


def experiment_frame(
    rng: np.random.Generator,
    experiment: str,
    treated: np.ndarray,
    first_user: int,
    slowdown: float,
) -> pd.DataFrame:
    """Events of one experiment: pre-period activity, requests, impressions, clicks, plays."""
    n = treated.size
    users = np.arange(first_user, first_user + n, dtype=np.uint64)
    variant = np.where(treated, "treatment", "control")
    activity = rng.gamma(2.0, 1.0, n)
    start = T0_MS + rng.integers(0, 7 * DAY_MS, n)

    pre_u = np.repeat(np.arange(n), rng.poisson(activity))
    pre = {
        "user_id": users[pre_u],
        "item_id": rng.integers(1, ITEMS + 1, pre_u.size),
        "event_type": "rating",
        "ts_ms": start[pre_u] - rng.integers(1, 6 * DAY_MS, pre_u.size),
    }
    n_req = 1 + rng.poisson(1.0, n)
    req_u = np.repeat(np.arange(n), n_req)
    offset = np.arange(req_u.size) - np.repeat(np.cumsum(n_req) - n_req, n_req)
    req_ts = start[req_u] + offset * 3_600_000
    req_id = np.char.add(f"{experiment}-", np.arange(req_u.size).astype(str))
    latency = rng.lognormal(np.log(40.0), 0.25, req_u.size) * np.where(
        treated[req_u], slowdown, 1.0
    )
    failed = rng.random(req_u.size) < 0.02
    errors = {
        "user_id": users[req_u[failed]],
        "event_type": "error",
        "ts_ms": req_ts[failed],
        "experiment": experiment,
        "variant": variant[req_u[failed]],
        "request_id": req_id[failed],
    }
    imp_r = np.repeat(np.flatnonzero(~failed), 3)
    impressions = {
        "user_id": users[req_u[imp_r]],
        "item_id": rng.integers(1, ITEMS + 1, imp_r.size),
        "event_type": "impression",
        "ts_ms": req_ts[imp_r],
        "experiment": experiment,
        "variant": variant[req_u[imp_r]],
        "request_id": req_id[imp_r],
        "position": np.tile(np.arange(3), imp_r.size // 3),
        "latency_ms": latency[imp_r],
    }
    # Only users with a served request (an impression) are in the experiment's metrics.
    served = np.unique(req_u[imp_r])
    p_convert = np.where(treated[served], CONVERSION["treatment"], CONVERSION["control"])
    converts = served[rng.random(served.size) < p_convert]
    click_u = np.repeat(served, rng.poisson(0.3 + 0.2 * activity[served]))
    plays = {
        "user_id": users[converts],
        "item_id": rng.integers(1, ITEMS + 1, converts.size),
        "event_type": "play",
        "ts_ms": start[converts] + 3_600_000 * 30,
    }
    clicks = {
        "user_id": users[click_u],
        "item_id": rng.integers(1, ITEMS + 1, click_u.size),
        "event_type": "click",
        "ts_ms": start[click_u] + 3_600_000 * 30,
    }
    frame = pd.concat(
        [pd.DataFrame(part) for part in (pre, errors, impressions, plays, clicks)],
        ignore_index=True,
    )
    frame["event_id"] = uuid_texts(rng, len(frame))
    frame["item_id"] = frame["item_id"].astype("UInt64")
    frame["position"] = frame["position"].astype("UInt16")
    frame["user_id"] = frame["user_id"].astype(np.uint64)
    frame["schema_version"] = np.uint8(1)
    return frame


def broken_split(rng: np.random.Generator, users: int = 12_000, share: float = 0.52) -> np.ndarray:
    """Exactly ``share`` of the users treated, in random order (a deterministic 52/48 bug)."""
    treated = np.zeros(users, dtype=bool)
    treated[: round(users * share)] = True
    return rng.permutation(treated)


@dataclass(frozen=True)
class Published:
    """The chdb data, the publisher's report and the readouts computed straight from chdb."""

    settings: Settings
    report: PublishReport
    readouts: dict[str, Readout]
    frames: dict[str, pd.DataFrame]

    @property
    def folder(self) -> Path:
        return self.settings.readouts_dir


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """Both experiments in one chdb directory, published once (the client is closed after)."""
    rng = np.random.default_rng(20240607)
    settings = Settings(data_dir=tmp_path_factory.mktemp("dashboard-data"))
    frames = {
        BROKEN: experiment_frame(rng, BROKEN, broken_split(rng), 1, slowdown=1.3),
        BALANCED: experiment_frame(rng, BALANCED, rng.random(4_000) < 0.5, 100_001, 1.0),
    }
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, ITEMS + 1),
            "title": "",
            "year": 2000,
            "genres": [list(rng.choice(GENRES, 2, replace=False)) for _ in range(ITEMS)],
        }
    )
    with analytics_client(settings.clickhouse) as client:
        load_item_dimension(client, items)
        for frame in frames.values():
            insert_event_frame(client, frame)
        report = publish_readouts(client, settings, with_pipeline=False)
        readouts = {name: experiment_readout(client, name) for name in frames}
    yield Published(settings, report, readouts, frames)
