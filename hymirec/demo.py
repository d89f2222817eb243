"""``hymirec demo``: the whole loop on the embedded defaults, with an A/B test at the end.

1. The embedded broker, item features (text embeddings + codebook) and the Feast repo.
2. The Faust worker, the ClickHouse sink (which also publishes the dashboard's readout
   snapshots, since it owns the chdb directory), the online trainer, the recommendation service
   and the dashboard, each a child process with its log under ``<data_dir>/logs``.
3. A warm start: the first ``warm_events`` MovieLens-100K ratings go through the pipeline, so that
   the trainer publishes a first version of every model the experiment serves.
4. The closed-loop simulator (in this process) sends its users to the service for
   ``duration_s`` seconds; the service logs exposures, the simulator clicks and plays.
5. When the sink has caught up, it stops (it owns chdb) and the readout is printed, beside the
   simulator's ground truth (the exact expected CTR of every served list).

Every child is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from features.item_features import build_item_features
from features.store import FeatureStoreClient
from hymirec.errors import HymirecError
from hymirec.movielens import load_ratings
from hymirec.processes import ServiceProcess
from hymirec.settings import Settings
from streaming.broker import LocalBroker
from streaming.kafka_io import EventProducer, ensure_topics
from streaming.replay import movielens_events, replay_events

__all__ = ["DemoResult", "run_demo", "wait_for_histories"]

EXPERIMENT = "hymirec-vs-sasrec"
EXTRA_ARMS = ("hstu", "persrec", "fuxi_mme")


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


def _experiments_file(settings: Settings, extra_arms: bool) -> Path:
    """The demo's experiment: HyMiRec vs SASRec, 50/50 (plus the other models when asked)."""
    variants = [
        {"name": "control", "weight": 50, "model": "sasrec"},
        {"name": "treatment", "weight": 50, "model": "hymirec"},
    ]
    if extra_arms:
        variants = [{**v, "weight": 20} for v in variants] + [
            {"name": name.replace("_", "-"), "weight": 20, "model": name} for name in EXTRA_ARMS
        ]
    config = {
        "default_model": "sasrec",
        "layers": [{"name": "ranking", "salt": "demo-ranking"}],
        "experiments": [
            {
                "name": EXPERIMENT,
                "layer": "ranking",
                "salt": "demo-hymirec-vs-sasrec",
                "range": [0.0, 1.0],
                "variants": variants,
            }
        ],
    }
    path = settings.data_dir.resolve() / "demo-experiments.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


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
        url = f"http://{settings.serve_host}:{settings.serve_port}/health/ready"
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _sink_lag(settings: Settings) -> int | None:
    from abtest.pipeline_health import pipeline_health

    for lag in pipeline_health(settings).consumer_lag:
        if lag.group == settings.sink_group_id and lag.topic == settings.events_topic:
            return lag.lag
    return None


def run_demo(
    settings: Settings,
    duration_s: float = 120.0,
    warm_events: int = 20_000,
    extra_arms: bool = False,
    keep_dashboard: bool | None = None,
    timeout_s: float = 900.0,
) -> DemoResult:
    """Run the loop (see the module docstring); return the readout and simulator statistics."""
    from abtest.readout import experiment_readout, format_readout
    from model.checkpoint_registry import CheckpointRegistry
    from simulator.client import load_population, run_simulation

    experiments = _experiments_file(settings, extra_arms)
    settings = settings.model_copy(
        update={
            "experiments_file": experiments,
            "trainer_models": "",
            "trainer_publish_every_s": min(settings.trainer_publish_every_s, 10.0),
        }
    )
    embedded = settings.kafka_bootstrap == f"{settings.broker_host}:{settings.broker_port}"
    broker = LocalBroker(settings.broker_dir, settings.broker_host, settings.broker_port)
    print(f"== hymirec demo: experiment {EXPERIMENT!r}, {duration_s:.0f} s of simulated traffic ==")
    for folder in (settings.feast_dir, settings.registry_dir, settings.clickhouse_dir):
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run: no state from earlier demos
    shutil.rmtree(settings.readouts_dir, ignore_errors=True)
    if embedded and broker.answers():
        # A broker already serves this address (`hymirec broker start`, or a test's): use it.
        print(f"[broker] using the broker already at {settings.kafka_bootstrap}")
        embedded = False
    elif embedded:
        broker.stop()
        shutil.rmtree(settings.broker_dir, ignore_errors=True)  # a fresh log every demo run
        status = broker.start()
        print(f"[broker] embedded noida-db ready at {status.address} (pid {status.pid})")
    children = _Children(settings)
    try:
        ensure_topics(settings)
        built = build_item_features(settings)
        print(
            f"[features] {len(built.table.item_ids)} items, codebook {built.codebook.levels}x"
            f"{built.codebook.size} ({built.codebook.bytes_per_item} bytes/item)"
        )
        children.start("worker", ["worker"])
        sink = children.start("sink", ["sink", "--publish-readouts"])
        children.start("trainer", ["trainer"])
        ratings = load_ratings().head(warm_events)
        with EventProducer(settings) as producer:
            sent = replay_events(producer, movielens_events(ratings))
        print(f"[warm start] {sent:,} MovieLens-100K ratings sent through the pipeline")
        from abtest.experiments import load_experiments

        models = sorted(load_experiments(experiments).models() | {"popular"})
        store = CheckpointRegistry(settings.registry_dir)
        _wait(
            lambda: all(store.latest_version(m) is not None for m in models),
            timeout_s,
            f"a first version of {', '.join(models)}",
            children,
        )
        print(f"[trainer] first versions published: {', '.join(models)}")
        children.start("serve", ["serve"])
        _wait(lambda: _service_ready(settings), timeout_s, "the service to be ready", children)
        print(f"[serve] ready at http://{settings.serve_host}:{settings.serve_port}/docs")
        children.start("dashboard", ["dashboard"])
        print(f"[dashboard] http://127.0.0.1:{settings.dashboard_port}")
        population = load_population(settings)
        stats = run_simulation(settings, duration_s, population=population)
        print(f"[simulator] {stats.summary()}")
        _wait(lambda: _sink_lag(settings) == 0, timeout_s, "the sink to catch up", children)
        children.stop(sink)  # it owns the chdb directory; the readout needs it
        readout = experiment_readout(
            settings,
            EXPERIMENT,
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
        if keep_dashboard is None:
            keep_dashboard = sys.stdin.isatty()
        if keep_dashboard:
            print(
                f"\n[dashboard] still at http://127.0.0.1:{settings.dashboard_port}; Ctrl-C stops"
            )
            while True:
                time.sleep(1)
        return DemoResult(readout, stats)
    finally:
        children.stop_all()
        if embedded:
            broker.stop()
        print("[stopped] every process the demo started")
