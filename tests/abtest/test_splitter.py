"""The splitter: reference hash values, vectorised vs scalar, traffic shares, independence of
layers, stability under config changes, the holdout, start/stop windows and targeting."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from abtest.experiments import (
    HOLDOUT,
    MAX_USER_ID,
    ExperimentsConfig,
    experiments_from_dict,
    load_experiments,
)
from abtest.splitter import Route, Splitter, fnv1a32, hash_v2, user_bucket, user_buckets
from core.errors import ExperimentConfigError
from core.settings import EXPERIMENTS_FILE

ALPHA = 0.001
MILLION = np.arange(1_000_000, dtype=np.int64)
T0 = 1_750_000_000_000  # 2025-06-15T15:06:40Z, inside the windows below

# Two layers with partial ranges, a holdout, targeting and a window: everything the splitter does.
MULTI: dict[str, Any] = yaml.safe_load(
    """
default_model: sasrec
holdout: {salt: test-holdout, percent: 10}
layers:
  - {name: ranking, salt: test-layer-ranking}
  - {name: ui, salt: test-layer-ui}
experiments:
  - name: models
    layer: ranking
    salt: test-models
    range: [0.0, 0.5]
    variants:
      - {name: control, weight: 2, model: sasrec}
      - {name: treatment, weight: 1, model: hymirec}
      - {name: third, weight: 1, model: hstu}
  - name: cohort
    layer: ranking
    salt: test-cohort
    range: [0.5, 0.8]
    start: 2025-01-01T00:00:00Z
    stop: 2026-01-01T00:00:00+01:00
    targeting: {user_id_min: 100, user_id_max: 900000, exclude_user_ids: [150, 151]}
    variants:
      - {name: control, weight: 1, model: sasrec}
      - {name: persrec, weight: 1, model: persrec}
  - name: page-size
    layer: ui
    salt: test-page-size
    range: [0.1, 0.9]
    variants:
      - {name: small, weight: 1, params: {page_size: 10}}
      - {name: large, weight: 3, params: {page_size: 20, dense: true}}
"""
)


def _config(**changes: Any) -> dict[str, Any]:
    return copy.deepcopy(MULTI | changes)


def _splitter(data: dict[str, Any] | None = None) -> Splitter:
    return Splitter(experiments_from_dict(MULTI if data is None else data))


def _single(weights: list[float], salt: str = "single") -> Splitter:
    variants = [{"name": f"v{i}", "weight": w} for i, w in enumerate(weights)]
    return Splitter(
        experiments_from_dict(
            {
                "default_model": "sasrec",
                "layers": [{"name": "layer", "salt": f"{salt}-layer"}],
                "experiments": [
                    {"name": "exp", "layer": "layer", "salt": salt, "range": [0, 1]}
                    | {"variants": variants}
                ],
            }
        )
    )


# --- the hash against published values ------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    # FNV-1a 32 test vectors (Fowler, Noll, Vo; IETF draft-eastlake-fnv, "", "a", "foobar").
    [(b"", 0x811C9DC5), (b"a", 0xE40C292C), (b"foobar", 0xBF9CF968)],
)
def test_fnv1a32_reference_values(data: bytes, expected: int) -> None:
    assert fnv1a32(data) == expected


# GrowthBook SDK conformance cases for hash(seed, value, 2) (packages/sdk-js/test/cases.json,
# spec 0.7.1, copied into growthbook/growthbook-python tests/cases.json), plus the bucket of the
# "creates experiments properly" feature case (seed "feature", id "123" → 0.5231).
GROWTHBOOK_V2 = [
    ("seed", "a", 0.0505),
    ("seed", "b", 0.2696),
    ("foo", "ab", 0.2575),
    ("foo", "def", 0.2019),
    ("89123klj", "8952klfjas09ujkasdf", 0.124),
    ("90850943850283058242805", "123", 0.7516),
    ("()**(%$##$%#$#", '___)((*":&', 0.0128),
    ("feature", "123", 0.5231),
]


@pytest.mark.parametrize(("seed", "value", "expected"), GROWTHBOOK_V2)
def test_hash_v2_matches_growthbook(seed: str, value: str, expected: float) -> None:
    assert hash_v2(seed, value) == pytest.approx(expected, abs=1e-12)


def test_user_buckets_of_numeric_ids_match_growthbook() -> None:
    cases = [(s, int(v), round(e * 10_000)) for s, v, e in GROWTHBOOK_V2 if v.isdigit()]
    for seed, user_id, bucket in cases:
        assert user_bucket(seed, user_id) == bucket
        assert user_buckets(seed, np.array([user_id]))[0] == bucket


# --- fast path against the reference ----------------------------------------------------------

_IDS = st.lists(
    st.one_of(
        st.integers(0, MAX_USER_ID),
        st.integers(0, 10**6),
        st.sampled_from([0, 9, 10, 99, 100, 10**18 - 1, 10**18, MAX_USER_ID]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(seed=st.text(max_size=20), ids=_IDS)
def test_vectorised_buckets_equal_scalar(seed: str, ids: list[int]) -> None:
    fast = user_buckets(seed, np.array(ids, dtype=np.uint64))
    assert fast.tolist() == [user_bucket(seed, u) for u in ids]
    assert fast.tolist() == [round(hash_v2(seed, str(u)) * 10_000) for u in ids]


@settings(max_examples=100, deadline=None)
@given(ids=_IDS, now_ms=st.sampled_from([0, T0, 1_800_000_000_000]))
def test_assign_many_equals_assign(ids: list[int], now_ms: int) -> None:
    splitter = _splitter()
    for experiment in ("models", "cohort", "page-size"):
        fast = splitter.assign_many(experiment, np.array(ids, dtype=np.int64), now_ms=now_ms)
        slow = [splitter.assign(experiment, u, now_ms=now_ms) or "" for u in ids]
        assert fast.tolist() == slow


@settings(max_examples=50, deadline=None)
@given(ids=_IDS)
def test_route_agrees_with_assign(ids: list[int]) -> None:
    splitter = _splitter()
    for user in ids:
        route = splitter.route(user, now_ms=T0)
        if route.held_out:
            assert route == Route("sasrec", HOLDOUT, HOLDOUT)
            continue
        for experiment in ("models", "cohort", "page-size"):
            variant = splitter.assign(experiment, user, now_ms=T0)
            layer = "ui" if experiment == "page-size" else "ranking"
            assert (route.layers.get(layer) == (experiment, variant)) == (variant is not None)


# --- shares, determinism, independence ---------------------------------------------------------


@pytest.mark.parametrize("weights", [[50, 50], [1, 2, 7], [0.2, 0.3, 0.5], [1, 1, 1]])
def test_variant_shares_match_weights(weights: list[float]) -> None:
    variants = _single(weights).assign_many("exp", MILLION)
    counts = [int(np.sum(variants == f"v{i}")) for i in range(len(weights))]
    assert sum(counts) == len(MILLION)
    expected = np.array(weights) / sum(weights) * len(MILLION)
    assert stats.chisquare(counts, expected).pvalue > ALPHA


def test_default_config_splits_half_and_half() -> None:
    splitter = Splitter(load_experiments(EXPERIMENTS_FILE))
    variants = splitter.assign_many("hymirec-vs-sasrec", MILLION)
    counts = [int(np.sum(variants == v)) for v in ("control", "treatment")]
    assert sum(counts) == len(MILLION)
    assert stats.chisquare(counts).pvalue > ALPHA


def test_same_variant_in_another_process() -> None:
    ids = list(range(0, 2_000_000, 997))
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from abtest.experiments import load_experiments\n"
        "from abtest.splitter import Splitter\n"
        "s = Splitter(load_experiments(Path(sys.argv[1])))\n"
        "ids = json.loads(sys.stdin.read())\n"
        "print(json.dumps([s.assign('hymirec-vs-sasrec', u) for u in ids]))\n"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345"}  # str hashing differs; ours must not
    done = subprocess.run(
        [sys.executable, "-c", script, str(EXPERIMENTS_FILE)],
        input=json.dumps(ids),
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    theirs = json.loads(done.stdout)
    splitter = Splitter(load_experiments(EXPERIMENTS_FILE))
    assert theirs == [splitter.assign("hymirec-vs-sasrec", u) for u in ids]
    assert set(theirs) == {"control", "treatment"}


def test_layers_are_independent() -> None:
    data = {
        "default_model": "sasrec",
        "layers": [{"name": "one", "salt": "layer-one"}, {"name": "two", "salt": "layer-two"}],
        "experiments": [
            {
                "name": name,
                "layer": layer,
                "salt": f"exp-{name}",
                "range": [0, 1],
                "variants": [{"name": f"v{i}", "weight": 1} for i in range(3)],
            }
            for name, layer in (("a", "one"), ("b", "two"))
        ],
    }
    splitter = Splitter(experiments_from_dict(data))
    a, b = splitter.assign_many("a", MILLION), splitter.assign_many("b", MILLION)
    table = np.array(
        [[np.sum((a == f"v{i}") & (b == f"v{j}")) for j in range(3)] for i in range(3)]
    )
    assert table.sum() == len(MILLION)
    assert stats.chi2_contingency(table).pvalue > ALPHA


def test_experiments_of_a_layer_are_exclusive_and_get_their_range() -> None:
    splitter = _splitter()
    in_models = splitter.assign_many("models", MILLION, now_ms=T0) != ""
    in_cohort = splitter.assign_many("cohort", MILLION, now_ms=T0) != ""
    assert not np.any(in_models & in_cohort)
    # models: range 0.5 of the 90% not held out.
    assert stats.binomtest(int(in_models.sum()), len(MILLION), 0.5 * 0.9).pvalue > ALPHA


# --- stability: changing one experiment never moves another's users ----------------------------


def test_adding_a_variant_leaves_other_experiments_alone() -> None:
    before = _splitter()
    changed = _config()
    changed["experiments"][0]["variants"].append({"name": "fourth", "weight": 1, "model": "hstu"})
    after = _splitter(changed)
    moved = before.assign_many("models", MILLION, now_ms=T0) != after.assign_many(
        "models", MILLION, now_ms=T0
    )
    assert moved.mean() > 0.1  # the changed experiment does reshuffle its own users
    for experiment in ("cohort", "page-size"):
        np.testing.assert_array_equal(
            before.assign_many(experiment, MILLION, now_ms=T0),
            after.assign_many(experiment, MILLION, now_ms=T0),
        )


def test_adding_and_removing_experiments_in_a_layer_leaves_the_others_alone() -> None:
    before = _splitter()
    changed = _config()
    del changed["experiments"][1]  # cohort goes
    changed["experiments"].append(
        {
            "name": "newcomer",
            "layer": "ranking",
            "salt": "test-newcomer",
            "range": [0.8, 1.0],
            "variants": [
                {"name": "control", "weight": 1, "model": "sasrec"},
                {"name": "fuxi", "weight": 1, "model": "fuxi_mme"},
            ],
        }
    )
    after = _splitter(changed)
    assert np.any(after.assign_many("newcomer", MILLION, now_ms=T0) != "")
    for experiment in ("models", "page-size"):
        np.testing.assert_array_equal(
            before.assign_many(experiment, MILLION, now_ms=T0),
            after.assign_many(experiment, MILLION, now_ms=T0),
        )


# --- holdout, windows, targeting ----------------------------------------------------------------


def test_holdout_gets_its_share_and_no_experiment() -> None:
    splitter = _splitter()
    held = user_buckets("test-holdout", MILLION) < 1000
    assert stats.binomtest(int(held.sum()), len(MILLION), 0.10).pvalue > ALPHA
    for experiment in ("models", "cohort", "page-size"):
        variants = splitter.assign_many(experiment, MILLION, now_ms=T0)
        assert not np.any(variants[held] != "")
        assert np.any(variants[~held] != "")
    for user in np.flatnonzero(held)[:200].tolist():
        assert splitter.held_out(user)
        assert splitter.route(user, now_ms=T0) == Route("sasrec", HOLDOUT, HOLDOUT)
        assert splitter.assign("models", user, now_ms=T0) is None


def test_start_and_stop_are_honoured() -> None:
    splitter = _splitter()
    start, stop = 1_735_689_600_000, 1_767_222_000_000  # 2025-01-01Z, 2026-01-01+01:00
    in_window = splitter.assign_many("cohort", MILLION, now_ms=start)
    assert np.any(in_window != "")
    np.testing.assert_array_equal(
        in_window, splitter.assign_many("cohort", MILLION, now_ms=stop - 1)
    )
    for now in (start - 1, stop, stop + 10**9):
        assert not np.any(splitter.assign_many("cohort", MILLION, now_ms=now) != "")
    member = int(np.flatnonzero(in_window != "")[0])
    assert splitter.assign("cohort", member, now_ms=start) == in_window[member]
    assert splitter.assign("cohort", member, now_ms=stop) is None
    assert splitter.route(member, now_ms=stop).model == "sasrec"


def test_targeting_is_honoured() -> None:
    splitter = _splitter()
    variants = splitter.assign_many("cohort", MILLION, now_ms=T0)
    targeted = (MILLION >= 100) & (MILLION <= 900_000) & ~np.isin(MILLION, [150, 151])
    assert not np.any(variants[~targeted] != "")
    assert np.any(variants[targeted] != "")
    # The untargeted users of cohort's range are in no other experiment of the layer either.
    positions = user_buckets("test-layer-ranking", MILLION)
    in_range = (positions >= 5000) & (positions < 8000)
    assert not np.any(splitter.assign_many("models", MILLION, now_ms=T0)[in_range] != "")

    allow = _config()
    allow["experiments"][1]["targeting"] = {"include_user_ids": [7, 8, 9, 10**12]}
    allowed = _splitter(allow).assign_many("cohort", MILLION, now_ms=T0)
    assert set(np.flatnonzero(allowed != "").tolist()) <= {7, 8, 9}


def test_route_serves_the_model_layer_and_merges_params() -> None:
    splitter = _splitter()
    config: ExperimentsConfig = splitter.config
    models = {v.name: v.model for v in config.experiment("models").variants}
    ui_params = {None: {}, "small": {"page_size": 10}, "large": {"page_size": 20, "dense": True}}
    seen: set[str] = set()
    for user in range(3000):
        route = splitter.route(user, now_ms=T0)
        seen.add(route.model)
        if route.held_out:
            continue
        ranking = route.layers.get("ranking")
        if ranking is None:
            assert (route.model, route.experiment, route.variant) == ("sasrec", None, None)
        else:
            assert (route.experiment, route.variant) == ranking
            if ranking[0] == "models":
                assert route.model == models[ranking[1]]
        ui = route.layers.get("ui", ("page-size", None))[1]
        assert route.params == ui_params[ui]
    assert seen == {"sasrec", "hymirec", "hstu", "persrec"}
    assert "model " in splitter.route(1, now_ms=T0).describe()


# --- bad input ------------------------------------------------------------------------------------


def test_unknown_experiment_is_refused_with_the_known_names() -> None:
    splitter = _splitter()
    for call in (
        lambda: splitter.assign("nope", 1),
        lambda: splitter.assign_many("nope", np.arange(3)),
    ):
        with pytest.raises(ExperimentConfigError, match=r"unknown experiment 'nope'.*models"):
            call()


@pytest.mark.parametrize("user_id", [-1, 2**63, True, 1.5, "7"])
def test_bad_user_ids_are_refused(user_id: Any) -> None:
    with pytest.raises(ExperimentConfigError, match="user_id"):
        _splitter().assign("models", user_id)
    with pytest.raises(ExperimentConfigError, match="user_id"):
        _splitter().route(user_id)


@pytest.mark.parametrize(
    "ids",
    [np.array([1, -1]), np.array([1.0, 2.0]), np.array(["1"]), np.array([2**64 - 1], np.uint64)],
)
def test_bad_user_id_arrays_are_refused(ids: np.ndarray) -> None:
    with pytest.raises(ExperimentConfigError, match="user_ids"):
        _splitter().assign_many("models", ids)
