"""What each ``hymirec`` sub-command does: wires settings into the packages (``hymirec.cli``
parses the command line and calls these)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import HymirecError
from core.settings import Settings, load_settings

if TYPE_CHECKING:
    from abtest.publish import ExperimentPlan

__all__ = [
    "broker",
    "dashboard",
    "demo",
    "evaluate",
    "experiments",
    "features",
    "readout",
    "replay",
    "serve",
    "simulate",
    "sink",
    "train",
    "trainer",
    "worker",
]


def broker(settings: Settings, args: argparse.Namespace) -> int:
    from streaming.broker import LocalBroker
    from streaming.kafka_io import ensure_topics

    broker = LocalBroker(settings.broker_dir, settings.broker.host, settings.broker.port)
    if args.action == "start":
        status = broker.start()
        created = ensure_topics(settings.kafka)
        print(f"broker ready at {status.address} (pid {status.pid}, data in {status.data_dir})")
        if created:
            print(f"created topics: {', '.join(created)}")
    elif args.action == "stop":
        print("broker stopped" if broker.stop() else "broker was not running")
    else:
        status = broker.status()
        state = "ready" if status.ready else ("starting" if status.running else "stopped")
        print(f"broker {state} at {status.address} (pid {status.pid}, data in {status.data_dir})")
        return 0 if status.ready else 3
    return 0


def features(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "build":
        from features.item_features import build_item_features

        built = build_item_features(settings)
        print(
            f"codebook {built.codebook.version}: {len(built.table.item_ids)} items, "
            f"{built.codebook.levels} levels x {built.codebook.size} codes, "
            f"{built.codebook.bytes_per_item} bytes/item; item views online"
        )
        return 0
    if args.action == "publish":
        from features.codebook import ResidualCodebook
        from features.codebook_publish import publish_codebook
        from features.store import FeatureStoreClient

        client = FeatureStoreClient(settings)
        client.apply_definitions()
        codebook = ResidualCodebook.load(settings.codebook_dir)
        print(f"codebook {publish_codebook(client, settings.feast_dir, codebook)} published")
        return 0
    if args.action == "serve":
        from features.server import ServeOptions, serve
        from features.store import FeatureStoreClient

        options = ServeOptions(host=args.host, port=args.port, workers=args.workers)
        serve(FeatureStoreClient(settings).store, options)
        return 0
    from hymirec.report import print_user_features

    print_user_features(settings, [int(u) for u in args.users])
    return 0


def worker(settings: Settings, args: argparse.Namespace) -> int:
    from streaming.app import run_worker

    run_worker(settings, loglevel=args.loglevel)
    return 0


def replay(settings: Settings, args: argparse.Namespace) -> int:
    from core.movielens import load_ratings
    from streaming.kafka_io import EventProducer, ensure_topics
    from streaming.replay import movielens_events, replay_events

    ensure_topics(settings.kafka)
    ratings = load_ratings()
    if args.limit:
        ratings = ratings.head(args.limit)
    with EventProducer(settings.kafka) as producer:
        sent = replay_events(producer, movielens_events(ratings), rate_per_s=args.rate)
    print(f"sent {sent} events to {settings.kafka.events_topic}")
    return 0


def demo(settings: Settings, args: argparse.Namespace) -> int:
    from hymirec.demo import run_demo

    run_demo(
        settings,
        duration_s=args.duration,
        warm_events=args.warm,
        scenario="all-models" if args.all_models else args.scenario,
        keep_dashboard=False if args.exit else None,
        timeout_s=args.timeout,
    )
    return 0


def _experiment_plans(settings: Settings) -> dict[str, ExperimentPlan]:
    """Weights and control of every configured experiment (a bad file fails here, at start)."""
    from abtest.experiments import load_experiments
    from abtest.publish import experiment_plans

    return experiment_plans(load_experiments(settings.experiments_file))


def _one_blas_thread() -> None:
    """The readout's numpy work is small matrices beside chdb's own threads: OpenBLAS's threads
    only fight chdb's for the cores (a 50k-user snapshot: 6.0 s of CPU with them, 0.20 s with
    one). Set before numpy is first imported; an explicit setting wins."""
    for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")


def sink(settings: Settings, args: argparse.Namespace) -> int:
    _one_blas_thread()
    from abtest.sink import run_sink
    from core.movielens import load_items
    from streaming.kafka_io import ensure_topics

    plans = _experiment_plans(settings) if args.publish_readouts else None
    ensure_topics(settings.kafka)
    stats = run_sink(
        settings,
        max_idle_s=args.max_idle,
        items=load_items(),
        publish_readouts=args.publish_readouts,
        plans=plans,
    )
    print(f"sink stopped: {stats.summary()}")
    return 0


def readout(settings: Settings, args: argparse.Namespace) -> int:
    _one_blas_thread()
    plans = _experiment_plans(settings)
    if args.publish:
        import signal
        import threading

        from abtest.publish import run_publish_loop

        stop = threading.Event()
        if not args.once:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: stop.set())
        failed = run_publish_loop(
            settings, every_s=args.every, stop=stop, plans=plans, once=args.once
        )
        print(f"readout snapshots in {settings.readouts_dir} ({failed} failed publish cycles)")
        return 1 if args.once and failed else 0
    if args.experiment is None:
        raise HymirecError("name an experiment, or pass --publish to write the dashboard snapshots")
    from abtest.publish import ExperimentPlan
    from abtest.readout import experiment_readout, format_readout

    plan = plans.get(args.experiment, ExperimentPlan())
    readout = experiment_readout(
        settings,
        args.experiment,
        control=args.control or plan.control,
        weights=plan.weights,
        notes=args.notes,
        sequential=plan.sequential,
        configured=plans,
    )
    print(format_readout(readout))
    return 0


def dashboard(settings: Settings, args: argparse.Namespace) -> int:

    import dashboard

    app = Path(dashboard.__file__).resolve().parent / "app.py"
    port = args.port or settings.dashboard.port
    command = [
        sys.executable,
        *("-m", "streamlit", "run", str(app)),
        *("--server.headless", "true", "--server.address", settings.dashboard.host),
        *("--server.port", str(port), "--browser.gatherUsageStats", "false"),
        *("--server.fileWatcherType", "none"),
    ]
    print(
        f"dashboard on http://{settings.dashboard.host}:{port} (reads {settings.readouts_dir})",
        flush=True,
    )
    # The app builds the same settings at its own edge from these HYMIREC_* variables. exec, not a
    # child process, so that SIGTERM and Ctrl-C reach Streamlit itself and nothing is orphaned.
    os.execve(sys.executable, command, {**os.environ, **settings.placeholders()})


def experiments(settings: Settings, args: argparse.Namespace) -> int:
    from abtest.experiments import load_experiments
    from abtest.splitter import Splitter

    config = load_experiments(args.file or settings.experiments_file)
    if args.action == "validate":
        print(config.summary())
    else:
        print(Splitter(config).route(args.user_id, now_ms=args.now_ms).describe())
    return 0


def train(settings: Settings, args: argparse.Namespace) -> int:
    from model.data import build_catalog, load_movielens_sequences
    from model.training.offline import (
        checkpoint_path,
        format_metrics,
        save_checkpoint,
        train_and_evaluate,
    )

    catalog, data = build_catalog(settings), load_movielens_sequences()
    run = train_and_evaluate(args.model, catalog, data, seed=args.seed, epochs=args.epochs)
    path = checkpoint_path(settings.data_dir, args.model, args.seed)
    save_checkpoint(run, path)
    print(f"valid: {format_metrics(run.valid)}")
    print(f"test:  {format_metrics(run.test)}")
    print(
        f"best epoch {run.best_epoch} of {run.epochs_run} ({run.train_time_s:.1f} s on "
        f"{run.device}); saved {path}"
    )
    return 0


def evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from model.data import build_catalog, load_movielens_sequences
    from model.training.offline import checkpoint_path, evaluate_checkpoint, format_metrics

    path = checkpoint_path(settings.data_dir, args.model, args.seed)
    metrics = evaluate_checkpoint(path, build_catalog(settings), load_movielens_sequences())
    print(f"test:  {format_metrics(metrics)}")
    return 0


def trainer(settings: Settings, args: argparse.Namespace) -> int:
    import signal
    import threading

    from abtest.experiments import trained_models
    from model.data import build_catalog
    from model.training.stream_loop import run_trainer

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        models = list(settings.trainer.model_names) or trained_models(settings.experiments_file)
    report = run_trainer(
        settings, build_catalog(settings), models, stop, args.max_idle, init_from=args.init_from
    )
    for name, versions in report.versions.items():
        last = versions[-1] if versions else "-"
        print(f"{name}: {len(versions)} version(s) published, last {last}")
    print(f"trainer: {report.samples} samples learned, {report.dead_letters} dead-lettered")
    return 0


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from serving.server import run_service

    if args.port is not None:
        settings = load_settings(serve_port=args.port)  # the environment, with the flag on top
    return run_service(settings)


def simulate(settings: Settings, args: argparse.Namespace) -> int:
    from simulator.client import run_simulation

    overrides = {
        name: value
        for name, value in (
            ("sim_users", args.users),
            ("sim_population", args.population),
            ("sim_rate_per_s", args.rate),
            ("sim_seed", args.seed),
        )
        if value is not None
    }
    if overrides:
        settings = load_settings(**overrides)  # the environment, with the flags on top
    stats = run_simulation(settings, args.duration, k=args.k, paced=not args.unpaced)
    print(f"simulator stopped: {stats.summary()}")
    return 0
