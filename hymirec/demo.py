"""``hymirec demo``: the whole loop on the embedded defaults, with an A/B test at the end.

1. The embedded broker, item features (text embeddings + codebook) and the Feast repo.
2. Every model the scenario serves (and ``popular``) trained offline on ML-100K, or taken from
   the cache (``model.training.pretrain``; the first run trains, with a progress bar).
3. The Faust worker and the ClickHouse sink (which also publishes the dashboard's readout
   snapshots, since it owns the chdb directory), each a child process with its log under
   ``<data_dir>/logs``. A warm start: the first ``warm_events`` (all 100,000) MovieLens-100K
   ratings go through the pipeline, until every user's history is online in Feast.
4. The online trainer starts from the offline versions (``--init-from``): it publishes them as
   the first versions and learns online from the end of the warm data on. Then the
   recommendation service and the dashboard.
5. The closed-loop simulator (in this process) sends the ML-100K users to the service for
   ``duration_s`` seconds; the service logs exposures, the simulator clicks and plays, and records
   the exact expected CTR of every served list (the ground truth) per arm and minute.
6. When the sink has caught up, it stops (it owns chdb) and the readout is printed, beside the
   ground truth and a verdict: which arm the truth favours, whether the test found it, and
   whether the CI covers the true lift.

Every child is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml

from abtest.ground_truth import GroundTruth
from abtest.readout import Readout
from core.errors import HymirecError
from core.movielens import load_ratings
from core.settings import Settings
from features.item_features import build_item_features
from features.store import FeatureStoreClient
from hymirec.freshness_report import trainer_freshness_lines
from hymirec.processes import ServiceProcess
from hymirec.scenarios import SCENARIOS
from model.checkpoint_registry import CheckpointRegistry
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics
from streaming.replay import movielens_events, replay_events

if TYPE_CHECKING:
    from simulator.client import SimulationStats
    from simulator.population import SimulatedPopulation

__all__ = [
    "EXPERIMENT",
    "SCENARIOS",
    "DemoResult",
    "run_demo",
    "truth_verdict",
    "wait_for_histories",
]

EXPERIMENT = "hymirec-vs-sasrec"


def wait_for_histories(
    store: FeatureStoreClient,
    expected: dict[int, int],
    timeout_s: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> float:
    """Poll Feast until every user's ``history_len`` equals ``expected``; return when it did."""
    users = sorted(expected)
    target = sum(expected.values())
    deadline = time.monotonic() + timeout_s
    while True:
        rows = store.user_histories(users)
        seen = sum(r.history_len for r in rows.values() if r is not None)
        if on_progress is not None:
            on_progress(seen, target)
        lengths = {u: (r.history_len if r is not None else 0) for u, r in rows.items()}
        if all(lengths[u] == expected[u] for u in users):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise HymirecError(f"online histories reached {seen}/{target} events in {timeout_s} s")
        time.sleep(0.5)


def _experiments_file(settings: Settings, scenario: str) -> Path:
    """The demo's experiment for ``scenario``: its arms, equal weights."""
    arms = SCENARIOS[scenario]
    weight = 100 // len(arms)
    variants = [{"name": name, "weight": weight, "model": model} for name, model in arms.items()]
    config = {
        "default_model": "sasrec",
        "layers": [{"name": "ranking", "salt": "demo-ranking"}],
        "experiments": [
            {
                "name": scenario,
                "layer": "ranking",
                "salt": f"demo-{scenario}",
                "range": [0.0, 1.0],
                "variants": variants,
            }
        ],
    }
    path = settings.data_dir.resolve() / "demo-experiments.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _pretrain(settings: Settings, models: list[str], epochs: int | None) -> Path:
    """Offline-train (or take from the cache) every model the trainer will serve; return the
    ``--init-from`` folder holding them."""
    from model.data import build_catalog, load_movielens_sequences
    from model.training.pretrain import (
        PRETRAIN_EPOCHS,
        ProgressBar,
        pretrained_checkpoint,
        pretrained_filename,
    )

    catalog, data = build_catalog(settings), load_movielens_sequences()
    folder = settings.data_dir.resolve() / "pretrained-start"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in models:
        budget = PRETRAIN_EPOCHS.get(name, 5) if epochs is None else epochs
        path, cached = pretrained_checkpoint(
            name,
            catalog,
            data,
            settings.embedding_cache_dir,
            seed=settings.trainer.seed,
            epochs=budget,
            on_epoch=ProgressBar(name, budget),
        )
        print(f"[pretrain] {name}: {'from the cache' if cached else 'trained'} ({path.name})")
        shutil.copyfile(path, folder / pretrained_filename(name))
    return folder


def truth_verdict(
    readout: Readout, truth: GroundTruth | None, scenario: str, alpha: float = 0.05
) -> list[str]:
    """Lines comparing the readout's CTR lift with the simulator's true lift, per treatment."""
    if truth is None:
        return ["no ground truth was recorded (no simulated request was served in the experiment)"]
    rows = readout.table[readout.table["metric"] == "ctr"]
    lines = []
    for row in rows.itertuples():
        control, treatment = str(row.control), str(row.treatment)
        true = truth.true_lift(control, treatment)
        low, high, lift = row.ci_rel_low, row.ci_rel_high, row.effect_rel
        measured = (
            f"measured CTR lift {_pct(lift)} (95% CI {_pct(low)} to {_pct(high)}, "
            f"p_holm {_num(row.p_holm)})"
        )
        if true is None:
            lines.append(
                f"{treatment} vs {control}: {measured}; no true lift (an arm had no lists)"
            )
            continue
        same_model = SCENARIOS.get(scenario, {}).get(treatment) == SCENARIOS.get(scenario, {}).get(
            control
        )
        if same_model:
            favours = "neither (one model in both arms: the true effect is 0)"
        elif abs(true) < 0.005:
            favours = "neither (true lift under 0.5%)"
        else:
            favours = treatment if true > 0 else control
        found = row.p_holm is not None and float(row.p_holm) < alpha
        direction_ok = found and lift is not None and (lift > 0) == (true > 0)
        if favours.startswith("neither"):
            test = (
                "the test found a difference (a false positive)"
                if found
                else ("the test found no difference (correct)")
            )
        elif direction_ok:
            test = "the test found it"
        elif found:
            test = "the test found the opposite direction"
        else:
            test = "the test did not find it (not enough power)"
        covers = low is not None and high is not None and low <= true <= high
        lines.append(
            f"{treatment} vs {control}: {measured}; true lift {_pct(true)} (ratio of the mean "
            f"expected CTR of the lists each arm served)"
        )
        lines.append(
            f"  verdict: the truth favours {favours}; {test}; the CI "
            f"{'covers' if covers else 'does not cover'} the true lift"
        )
    return lines


def _pct(value: object) -> str:
    if value is None or not isinstance(value, int | float) or value != value:
        return "-"
    return f"{100 * float(value):+.1f}%"


def _num(value: object) -> str:
    if value is None or not isinstance(value, int | float) or value != value:
        return "-"
    return f"{float(value):.3g}"


class DemoResult:
    """What a demo run produced (for tests): the readout and the simulator's statistics."""

    def __init__(self, readout: object, stats: object) -> None:
        self.readout = readout
        self.stats = stats


class _Children:
    """The demo's child processes, stopped in reverse order of start."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started: list[ServiceProcess] = []

    def start(self, name: str, args: list[str]) -> ServiceProcess:
        process = ServiceProcess(name, args, self.settings).start()
        self.started.append(process)
        print(f"[{name}] started (pid {process.pid}, log {process.log_path})", flush=True)
        return process

    def check(self) -> None:
        for process in self.started:
            if not process.alive():
                raise HymirecError(f"the {process.name} exited:\n{process.tail()}")

    def stop(self, process: ServiceProcess) -> None:
        process.stop()
        if process in self.started:
            self.started.remove(process)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()
        self.started.clear()


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, children: _Children) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        children.check()
        if time.monotonic() > deadline:
            raise HymirecError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def _service_ready(settings: Settings) -> bool:
    try:
        url = f"http://{settings.serve.host}:{settings.serve.port}/health/ready"
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _sink_lag(settings: Settings) -> int | None:
    from abtest.pipeline_health import pipeline_health

    for lag in pipeline_health(settings).consumer_lag:
        if lag.group == settings.sink.group_id and lag.topic == settings.kafka.events_topic:
            return lag.lag
    return None


def _demo_settings(settings: Settings, experiments: Path) -> Settings:
    return settings.updated(
        experiments_file=experiments,
        trainer_models="",
        trainer_publish_every_s=min(settings.trainer.publish_every_s, 10.0),
        # Six processes share the machine's cores: one torch thread each for the trainer
        # unless set (two threads beside busy neighbours were slower than one).
        trainer_threads=settings.trainer.threads or 1,
    )


def _start_broker(settings: Settings) -> tuple[LocalBroker, bool]:
    """The broker, after clearing the state of earlier demos; True when the demo owns it."""
    for folder in (
        settings.feast_dir,
        settings.registry_dir,
        settings.clickhouse_dir,
        settings.readouts_dir,
        settings.ground_truth_dir,
    ):
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run: no state from earlier demos
    embedded = settings.kafka.bootstrap == f"{settings.broker.host}:{settings.broker.port}"
    broker = LocalBroker(settings.broker_dir, settings.broker.host, settings.broker.port)
    if embedded and broker.answers():
        # A broker already serves this address (`hymirec broker start`, or a test's): use it.
        print(f"[broker] using the broker already at {settings.kafka.bootstrap}")
        return broker, False
    if embedded:
        broker.stop()
        shutil.rmtree(settings.broker_dir, ignore_errors=True)  # a fresh log every demo run
        status = broker.start()
        print(f"[broker] embedded noida-db ready at {status.address} (pid {status.pid})")
    return broker, embedded


def _warm_start(settings: Settings, warm_events: int, timeout_s: float) -> None:
    """Every rating of the warm start through the pipeline, until every history is online."""
    ratings = load_ratings().head(warm_events)
    with EventProducer(settings.kafka) as producer:
        sent = replay_events(producer, movielens_events(ratings))
    print(f"[warm start] {sent:,} MovieLens-100K ratings sent through the pipeline")
    expected = {int(u): int(n) for u, n in ratings.groupby("user_id").size().items()}
    wait_for_histories(FeatureStoreClient(settings), expected, timeout_s)
    print(f"[warm start] {len(expected):,} users' histories online in Feast")


def _start_serving(
    settings: Settings, children: _Children, models: list[str], init_from: Path, timeout_s: float
) -> None:
    """The trainer from the offline versions, then the service and the dashboard."""
    children.start("trainer", ["trainer", "--init-from", str(init_from)])
    store = CheckpointRegistry(settings.registry_dir)
    _wait(
        lambda: all(store.latest_version(m) is not None for m in models),
        timeout_s,
        f"a first version of {', '.join(models)}",
        children,
    )
    print(f"[trainer] pretrained versions published: {', '.join(models)}")
    children.start("serve", ["serve"])
    _wait(lambda: _service_ready(settings), timeout_s, "the service to be ready", children)
    print(f"[serve] ready at http://{settings.serve.host}:{settings.serve.port}/docs")
    children.start("dashboard", ["dashboard"])
    print(f"[dashboard] http://127.0.0.1:{settings.dashboard.port}")


def _report(
    settings: Settings, scenario: str, stats: SimulationStats, population: SimulatedPopulation
) -> Readout:
    """The readout, the simulator's ground truth beside it, and the verdict (printed)."""
    from abtest.ground_truth import read_ground_truth
    from abtest.readout import experiment_readout, format_readout

    readout = experiment_readout(
        settings,
        scenario,
        control="control",
        notes=("Every arm's model trains on the pooled stream of all arms (DESIGN.md)."),
    )
    print("\n" + format_readout(readout))
    print("\n== simulator ground truth (exact expectations over the served lists) ==")
    for variant, arm in sorted(stats.variants.items()):
        print(
            f"{variant:>10}: requests {arm.requests:,}  observed CTR {arm.ctr:.4f}  "
            f"expected CTR {arm.expected_ctr:.4f}  clusters consumed per clicking user "
            f"{arm.mean_clusters_consumed(population):.2f}"
        )
    truth = read_ground_truth(settings.ground_truth_dir, scenario)
    if truth is not None:
        print("\nexpected CTR per minute (the simulation's ground truth):")
        for point in truth.points:
            minute = time.strftime("%H:%M", time.gmtime(point.minute_start_ms / 1000))
            print(
                f"  {minute} {point.variant:>10}: {point.expected_ctr or 0:.4f} over "
                f"{point.requests} lists"
            )
    print("\n== the readout against the truth ==")
    for line in truth_verdict(readout, truth, scenario):
        print(line)
    return readout


def run_demo(
    settings: Settings,
    duration_s: float = 120.0,
    warm_events: int = 100_000,
    scenario: str = EXPERIMENT,
    keep_dashboard: bool | None = None,
    timeout_s: float = 900.0,
    pretrain_epochs: int | None = None,
) -> DemoResult:
    """Run the loop (see the module docstring); return the readout and simulator statistics.

    ``pretrain_epochs`` overrides every model's offline budget (``model.training.pretrain``;
    tests use 1).
    """
    from abtest.experiments import trained_models
    from simulator.client import load_population, run_simulation

    if scenario not in SCENARIOS:
        raise HymirecError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    experiments = _experiments_file(settings, scenario)
    settings = _demo_settings(settings, experiments)
    print(f"== hymirec demo: experiment {scenario!r}, {duration_s:.0f} s of simulated traffic ==")
    broker, owned = _start_broker(settings)
    children = _Children(settings)
    started = time.monotonic()
    try:
        ensure_topics(settings.kafka)
        built = build_item_features(settings)
        print(
            f"[features] {len(built.table.item_ids)} items, codebook {built.codebook.levels}x"
            f"{built.codebook.size} ({built.codebook.bytes_per_item} bytes/item)"
        )
        models = trained_models(experiments)
        init_from = _pretrain(settings, models, pretrain_epochs)
        children.start("worker", ["worker"])
        sink = children.start("sink", ["sink", "--publish-readouts"])
        _warm_start(settings, warm_events, timeout_s)
        _start_serving(settings, children, models, init_from, timeout_s)
        population = load_population(settings)
        print(f"[simulator] {population.num_users} users ({settings.sim.population} population)")
        traffic_start_ms = int(time.time() * 1000)
        stats = run_simulation(settings, duration_s, population=population)
        traffic_end_ms = int(time.time() * 1000)
        print(f"[simulator] {stats.summary()}")
        _wait(lambda: _sink_lag(settings) == 0, timeout_s, "the sink to catch up", children)
        for line in trainer_freshness_lines(settings, models, traffic_start_ms, traffic_end_ms):
            print(line)
        children.stop(sink)  # it owns the chdb directory; the readout needs it
        readout = _report(settings, scenario, stats, population)
        print(f"\n[demo] {time.monotonic() - started:.0f} s from the broker's start to the verdict")
        if keep_dashboard is None:
            keep_dashboard = sys.stdin.isatty()
        if keep_dashboard:
            print(
                f"\n[dashboard] still at http://127.0.0.1:{settings.dashboard.port}; Ctrl-C stops"
            )
            while True:
                time.sleep(1)
        return DemoResult(readout, stats)
    finally:
        children.stop_all()
        if owned:
            broker.stop()
        print("[stopped] every process the demo started")
