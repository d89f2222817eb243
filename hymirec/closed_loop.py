"""Short closed-loop A/B runs in one process, their readout checked against the simulator's truth.

:func:`run_closed_loop` plays one experiment: Poisson arrivals of uniformly drawn users; each user
is assigned to a variant by the splitter's own hash (``abtest.splitter``; one experiment over the
whole layer, equal weights, a salt per seed so that every run splits the users differently); the
variant's model ranks the user's current history with the service's own ranking code
(``serving.models.LoadedModel.rank``); the simulated user responds. The per-user metric frame
that ``abtest.metrics`` would read from ClickHouse is built from those impressions, clicks and
plays, and the readout's own statistics (``abtest.readout.readout_from_metrics``) judge it.

**The truth.** For every request the exact expected CTR (``SimulatedPopulation.expected``) of
the list served *and*, counterfactually, of the list every other arm would have served the same
user at the same moment. Two true lifts per treatment T against control C:

- *served lists*: ``mean(expected CTR of the lists T served) / mean(... C served) - 1``, the
  figure the demo prints (DESIGN.md: the readout's interval should cover it);
- *counterfactual*: over all requests, ``mean(E CTR of T's list) / mean(E CTR of C's list) - 1``,
  what the lift would be had everyone got T rather than C; exactly 0 in an A/A test. It is a
  one-request counterfactual: each user's history is the one their own arm shaped, so once the
  arms' clicks have made the histories diverge (long runs) it misses the feedback loop that the
  served-lists truth, and the readout, include.

**Shortcuts** (why it runs in seconds): no HTTP, no broker, no Feast, no ClickHouse, no online
learning (every arm's model stays at the version it was given, e.g. the pretrained one), and the
users' histories are kept in memory. A history starts as the user's real ML-100K history (a
:class:`~simulator.grounded.GroundedPopulation`; other populations start empty, i.e. cold) and
grows as the stream worker's does: each click and each play appends the item (oldest first, the
last ``long_len`` kept); the service's view of it (the last ``recent_len`` ids, the codes of the
long history, the seen items) is rebuilt as ``serving.features.UserFeatureReader.decode`` builds
it. Latency and errors are not simulated (``latency_ms_sum`` 0, ``errors`` 0, so those guardrail
rows have zero variance and no p-value), and no user has pre-experiment events
(``pre_positive_events`` 0: CUPED falls back to Welch).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from abtest.experiments import ExperimentsConfig, experiments_from_dict
from abtest.metrics import USER_METRIC_COLUMNS, ExperimentMetrics
from abtest.readout import Readout, readout_from_metrics
from abtest.splitter import Splitter
from core.errors import ConfigError
from hymirec.scenarios import SCENARIOS as DEMO_SCENARIOS
from model.base import CatalogInfo
from model.data import SequenceData, load_movielens_sequences
from model.training.offline import load_checkpoint
from model.training.pretrain import pretrained_checkpoint
from serving.features import CodeIndex, UserHistory, catalog_codebook
from serving.models import POPULAR, LoadedModel, movielens_popularity
from simulator.grounded import GroundedPopulation
from simulator.population import Outcome, SimulatedPopulation, poisson_arrivals

__all__ = [
    "EXPERIMENT",
    "SCENARIOS",
    "ClosedLoopResult",
    "HistoryViews",
    "TreatmentLift",
    "closed_loop_config",
    "pretrained_models",
    "run_closed_loop",
    "scenario_arms",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

EXPERIMENT = "closed-loop"
# Scenario -> (control model, treatment model): the demo's two-arm scenarios.
SCENARIOS: dict[str, tuple[str, str]] = {
    name: (arms["control"], arms["treatment"])
    for name, arms in DEMO_SCENARIOS.items()
    if set(arms) == {"control", "treatment"}
}
_DTYPES: dict[str, str] = {
    "user_id": "uint64",
    "variant": "object",
    "latency_ms_sum": "float64",
} | {c: "int64" for c in USER_METRIC_COLUMNS if c not in ("user_id", "variant", "latency_ms_sum")}


def pretrained_models(
    names: Iterable[str],
    catalog: CatalogInfo,
    cache_dir: Path,
    *,
    seed: int = 0,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, LoadedModel]:
    """Each named model at its offline-pretrained version (``model.training.pretrain``: cached in
    ``cache_dir``, trained now if missing), loaded as the service loads it; ``popular`` is the
    service's built-in ML-100K prior."""
    models: dict[str, LoadedModel] = {}
    data: SequenceData | None = None
    for name in dict.fromkeys(names):
        if name == POPULAR:
            models[name] = movielens_popularity(catalog)
            continue
        data = data or load_movielens_sequences()
        path, _ = pretrained_checkpoint(
            name, catalog, data, cache_dir, seed=seed, on_epoch=on_epoch
        )
        model = load_checkpoint(path, catalog).model
        models[name] = LoadedModel.build(name, f"pretrained-{path.stem}", model, 0)
    return models


def scenario_arms(scenario: str, models: Mapping[str, LoadedModel]) -> dict[str, LoadedModel]:
    """``{"control": ..., "treatment": ...}`` of a :data:`SCENARIOS` entry (A/A: one model
    object in both arms)."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario: {scenario!r} is not one of {sorted(SCENARIOS)}")
    control, treatment = SCENARIOS[scenario]
    return {"control": models[control], "treatment": models[treatment]}


def closed_loop_config(variants: Sequence[str], seed: int) -> ExperimentsConfig:
    """One experiment over the whole layer, ``variants`` at equal weights, salted by ``seed``."""
    return experiments_from_dict(
        {
            "default_model": "popular",
            "layers": [{"name": "ranking", "salt": f"closed-loop-layer-{seed}"}],
            "experiments": [
                {
                    "name": EXPERIMENT,
                    "layer": "ranking",
                    "salt": f"closed-loop-{seed}",
                    "range": [0.0, 1.0],
                    "variants": [{"name": v, "weight": 1.0} for v in variants],
                }
            ],
        },
        source="closed-loop run",
    )


@dataclass(frozen=True)
class TreatmentLift:
    """One treatment's CTR lift over control: what the readout measured, and the truth."""

    treatment: str
    measured: float  # relative CTR lift (the readout's effect_rel)
    ci_low: float  # its (1 - alpha) interval, relative (delta method)
    ci_high: float
    p_value: float
    p_holm: float
    significant_holm: bool
    served_truth: float  # ratio of mean expected CTR over the lists each arm served, minus 1
    counterfactual_truth: float  # everyone on treatment vs everyone on control, minus 1

    def covers(self, truth: float) -> bool:
        return bool(self.ci_low <= truth <= self.ci_high)

    @property
    def found(self) -> bool:
        """Significant after Holm and on the side of the counterfactual truth."""
        return self.significant_holm and self.measured * self.counterfactual_truth > 0


@dataclass(frozen=True, eq=False)
class ClosedLoopResult:
    """One run: per-request records, the per-user frame, the readout and the lifts.

    Per request ``r`` (in arrival order): ``user`` (population index), ``variant`` (index into
    ``variants``), ``t_s``, ``impressions``/``clicks``/``plays`` of the served list, and
    ``expected_ctr[r, a]`` the exact expected CTR of arm ``a``'s list for that user at that time
    (the served one is ``expected_ctr[r, variant[r]]``).
    """

    seed: int
    control: str
    variants: tuple[str, ...]
    user: IntArray
    variant: IntArray
    t_s: FloatArray
    impressions: IntArray
    clicks: IntArray
    plays: IntArray
    expected_ctr: FloatArray
    metrics: ExperimentMetrics
    readout: Readout
    lifts: dict[str, TreatmentLift]
    elapsed_s: float

    def served_truth(self, treatment: str) -> float:
        """Mean expected CTR of the lists ``treatment`` served over control's, minus 1."""
        return _served_mean(self, treatment) / _served_mean(self, self.control) - 1.0

    def counterfactual_truth(self, treatment: str) -> float:
        """Over every request, mean expected CTR of treatment's lists over control's, minus 1."""
        t, c = self.variants.index(treatment), self.variants.index(self.control)
        return float(self.expected_ctr[:, t].mean() / self.expected_ctr[:, c].mean()) - 1.0

    @property
    def any_holm_rejection(self) -> bool:
        """Whether any metric of any treatment is significant after Holm (the A/A error)."""
        return bool((self.readout.table["p_holm"] < self.readout.alpha).any())


def _served_mean(result: ClosedLoopResult, variant: str) -> float:
    a = result.variants.index(variant)
    served = result.expected_ctr[result.variant == a, a]
    return float(served.mean()) if len(served) else math.nan


@dataclass
class _UserState:
    """One user's history as the stream worker keeps it, and what depends only on it."""

    items: list[int]
    count: int
    first_exposure_ms: int = -1
    exposures: int = 0
    impressions: int = 0
    clicks: int = 0
    plays: int = 0
    genres: set[str] = field(default_factory=set)
    view: UserHistory | None = None  # the service's view of ``items``; None = rebuild
    ranked: dict[int, list[int]] = field(default_factory=dict)  # id(arm) -> its list, this history

    def append(self, item_id: int, long_len: int) -> None:
        self.items.append(item_id)
        del self.items[: max(0, len(self.items) - long_len)]
        self.count += 1
        self.view, self.ranked = None, {}


class HistoryViews:
    """Builds the :class:`UserHistory` the service would read for a user (features.decode)."""

    def __init__(self, catalog: CatalogInfo, recent_len: int) -> None:
        self.codes = catalog.codes.numpy().astype(np.int64)
        self.code_index = CodeIndex(self.codes, catalog_codebook(catalog).UNKNOWN)
        self.recent_len = recent_len

    def view(self, user_id: int, state: _UserState) -> UserHistory | None:
        if not state.items:
            return None  # a cold start: the service ranks ``None``
        if state.view is None:
            state.view = self.of_items(user_id, state.items, state.count)
        return state.view

    def of_items(self, user_id: int, items: Sequence[int], count: int) -> UserHistory:
        """The service's view of a history whose last items (oldest first) are ``items``."""
        kept = np.asarray(items, dtype=np.int64)
        recent = kept[-self.recent_len :]
        long_codes = self.codes[kept]
        seen = np.union1d(recent, self.code_index.items(long_codes))
        return UserHistory(user_id, recent, long_codes, count, seen[seen > 0])


def _check(arms: Mapping[str, LoadedModel], control: str, requests: int, k: int) -> None:
    if len(arms) < 2:
        raise ConfigError(f"arms: a closed-loop run needs at least two variants; got {list(arms)}")
    if control not in arms:
        raise ConfigError(f"control: {control!r} is not one of the arms {sorted(arms)}")
    if requests < 1 or k < 1:
        raise ConfigError(f"requests and k must be >= 1; got requests={requests}, k={k}")


def _closed_loop_readout(
    metrics: ExperimentMetrics,
    control: str,
    variants: tuple[str, ...],
    alpha: float,
    seed: int,
    requests: int,
) -> Readout:
    return readout_from_metrics(
        metrics,
        control,
        {v: 1.0 for v in variants},
        alpha,
        notes=(
            f"closed-loop simulation, seed {seed}, {requests} requests: models fixed (no online "
            "learning), no HTTP, broker, Feast or ClickHouse"
        ),
    )


def run_closed_loop(
    population: SimulatedPopulation,
    arms: Mapping[str, LoadedModel],
    *,
    catalog: CatalogInfo,
    requests: int,
    k: int = 10,
    seed: int,
    control: str,
    rate_per_s: float = 20.0,
    alpha: float = 0.05,
    recent_len: int = 50,
    long_len: int = 1000,
) -> ClosedLoopResult:
    """One seeded in-process A/B run of ``requests`` requests (see the module docstring).

    ``arms`` maps variant names (the splitter's safe names) to the model each serves; ``catalog``
    is the one the models were built with (its codes make the long history, its genres the
    ``genres_consumed`` metric). The same ``seed`` gives the same run.
    """
    _check(arms, control, requests, k)
    started = time.perf_counter()
    variants = (control, *(v for v in arms if v != control))
    models = [arms[v] for v in variants]
    user_ids = np.array([population.user_id(u) for u in range(population.num_users)], np.int64)
    assigned = Splitter(closed_loop_config(variants, seed)).assign_many(EXPERIMENT, user_ids, 0)
    arm_of_user = np.array([variants.index(str(v)) for v in assigned], dtype=np.int64)
    views = HistoryViews(catalog, recent_len)
    arrivals = poisson_arrivals(rate_per_s, population.num_users, np.random.default_rng([seed, 0]))
    respond_rng = np.random.default_rng([seed, 1])
    states: dict[int, _UserState] = {}
    user, variant, impressions, clicks, plays = (np.zeros(requests, np.int64) for _ in range(5))
    t_s = np.zeros(requests)
    expected = np.zeros((requests, len(variants)))
    for r in range(requests):
        arrival = next(arrivals)
        u, a = arrival.user, int(arm_of_user[arrival.user])
        if u not in states:
            states[u] = _new_state(population, u, long_len)
        state = states[u]
        history = views.view(int(user_ids[u]), state)
        lists = [_ranked(model, state, history, k) for model in models]
        ctr_of: dict[tuple[int, ...], float] = {}  # A/A arms serve the same list: compute once
        for b, items in enumerate(lists):
            key = tuple(items)
            if key not in ctr_of:
                ctr_of[key] = population.expected(u, items, arrival.t_s).ctr
            expected[r, b] = ctr_of[key]
        outcomes = population.respond(u, lists[a], arrival.t_s, respond_rng)
        user[r], variant[r], t_s[r] = u, a, arrival.t_s
        impressions[r] = len(outcomes)
        clicks[r] = sum(o.clicked for o in outcomes)
        plays[r] = sum(o.played for o in outcomes)
        _record(state, arrival.t_s, outcomes, catalog, long_len)
    metrics = _user_metrics(states, user_ids, arm_of_user, variants)
    result = ClosedLoopResult(
        seed=seed,
        control=control,
        variants=variants,
        user=user,
        variant=variant,
        t_s=t_s,
        impressions=impressions,
        clicks=clicks,
        plays=plays,
        expected_ctr=expected,
        metrics=metrics,
        readout=_closed_loop_readout(metrics, control, variants, alpha, seed, requests),
        lifts={},
        elapsed_s=0.0,
    )
    lifts = {v: _lift(result, v) for v in variants[1:]}
    return dataclasses.replace(result, lifts=lifts, elapsed_s=time.perf_counter() - started)


def _new_state(population: SimulatedPopulation, user: int, long_len: int) -> _UserState:
    if isinstance(population, GroundedPopulation):
        real = [int(i) for i in population.history_items(user)]
        return _UserState(items=real[-long_len:], count=len(real))
    return _UserState(items=[], count=0)


def _ranked(
    model: LoadedModel, state: _UserState, history: UserHistory | None, k: int
) -> list[int]:
    """The arm's list for this history, ranked once per history version (the models are fixed and
    see no times, so the list changes only when the history does)."""
    found = state.ranked.get(id(model))
    if found is None:
        found = state.ranked[id(model)] = model.rank(history, k)
    return found


def _record(
    state: _UserState, t_s: float, outcomes: Sequence[Outcome], catalog: CatalogInfo, long_len: int
) -> None:
    if state.first_exposure_ms < 0:
        state.first_exposure_ms = round(t_s * 1000)
    state.exposures += 1
    state.impressions += len(outcomes)
    for outcome in outcomes:  # the client sends a click, then its play: the worker appends both
        for happened in (outcome.clicked, outcome.played):
            if happened:
                state.append(outcome.item_id, long_len)
                if 0 < outcome.item_id < len(catalog.genres):
                    state.genres |= catalog.genres[outcome.item_id]
        state.clicks += int(outcome.clicked)
        state.plays += int(outcome.played)


def _user_metrics(
    states: Mapping[int, _UserState],
    user_ids: IntArray,
    arm_of_user: IntArray,
    variants: Sequence[str],
) -> ExperimentMetrics:
    """The frame ``abtest.metrics.user_metrics`` returns, one row per exposed user."""
    exposed = sorted(states, key=lambda u: int(user_ids[u]))
    rows = [states[u] for u in exposed]
    columns: dict[str, object] = {
        "user_id": [int(user_ids[u]) for u in exposed],
        "variant": [variants[int(arm_of_user[u])] for u in exposed],
        "first_exposure_ms": [s.first_exposure_ms for s in rows],
        "exposures": [s.exposures for s in rows],
        "impressions": [s.impressions for s in rows],
        "clicks": [s.clicks for s in rows],
        "plays": [s.plays for s in rows],
        "converted": [int(s.plays > 0) for s in rows],
        "genres_consumed": [len(s.genres) for s in rows],
        "latency_ms_sum": [0.0] * len(rows),
        "latency_requests": [s.exposures for s in rows],
        "errors": [0] * len(rows),
        "requests": [s.exposures for s in rows],
        "pre_positive_events": [0] * len(rows),
    }
    users = pd.DataFrame(columns, columns=list(USER_METRIC_COLUMNS)).astype(_DTYPES)
    return ExperimentMetrics(EXPERIMENT, users, excluded_users=0, pre_days=0)


def _lift(result: ClosedLoopResult, treatment: str) -> TreatmentLift:
    table = result.readout.table
    row = table[(table["metric"] == "ctr") & (table["treatment"] == treatment)].iloc[0]

    def number(column: str) -> float:
        value = row[column]
        return math.nan if value is None or pd.isna(value) else float(value)

    p_holm = number("p_holm")
    return TreatmentLift(
        treatment=treatment,
        measured=number("effect_rel"),
        ci_low=number("ci_rel_low"),
        ci_high=number("ci_rel_high"),
        p_value=number("p_value"),
        p_holm=p_holm,
        significant_holm=bool(p_holm < result.readout.alpha),
        served_truth=result.served_truth(treatment),
        counterfactual_truth=result.counterfactual_truth(treatment),
    )
