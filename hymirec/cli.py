"""The ``hymirec`` command: wires settings into the packages; holds no logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import HymirecError
from core.settings import Settings, load_settings
from hymirec.scenarios import SCENARIOS

if TYPE_CHECKING:
    from abtest.publish import ExperimentPlan

__all__ = ["main"]


def _broker(settings: Settings, args: argparse.Namespace) -> int:
    from streaming.broker import LocalBroker
    from streaming.kafka_io import ensure_topics

    broker = LocalBroker(settings.broker_dir, settings.broker_host, settings.broker_port)
    if args.action == "start":
        status = broker.start()
        created = ensure_topics(settings)
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


def _features(settings: Settings, args: argparse.Namespace) -> int:
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


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from streaming.app import run_worker

    run_worker(settings, loglevel=args.loglevel)
    return 0


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from core.movielens import load_ratings
    from streaming.kafka_io import EventProducer, ensure_topics
    from streaming.replay import movielens_events, replay_events

    ensure_topics(settings)
    ratings = load_ratings()
    if args.limit:
        ratings = ratings.head(args.limit)
    with EventProducer(settings) as producer:
        sent = replay_events(producer, movielens_events(ratings), rate_per_s=args.rate)
    print(f"sent {sent} events to {settings.events_topic}")
    return 0


def _demo(settings: Settings, args: argparse.Namespace) -> int:
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


def _sink(settings: Settings, args: argparse.Namespace) -> int:
    _one_blas_thread()
    from abtest.sink import run_sink
    from core.movielens import load_items
    from streaming.kafka_io import ensure_topics

    plans = _experiment_plans(settings) if args.publish_readouts else None
    ensure_topics(settings)
    stats = run_sink(
        settings,
        max_idle_s=args.max_idle,
        items=load_items(),
        publish_readouts=args.publish_readouts,
        plans=plans,
    )
    print(f"sink stopped: {stats.summary()}")
    return 0


def _readout(settings: Settings, args: argparse.Namespace) -> int:
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


def _dashboard(settings: Settings, args: argparse.Namespace) -> int:

    import dashboard

    app = Path(dashboard.__file__).resolve().parent / "app.py"
    port = args.port or settings.dashboard_port
    command = [
        sys.executable,
        *("-m", "streamlit", "run", str(app)),
        *("--server.headless", "true", "--server.address", settings.dashboard_host),
        *("--server.port", str(port), "--browser.gatherUsageStats", "false"),
        *("--server.fileWatcherType", "none"),
    ]
    print(
        f"dashboard on http://{settings.dashboard_host}:{port} (reads {settings.readouts_dir})",
        flush=True,
    )
    # The app builds the same settings at its own edge from these HYMIREC_* variables. exec, not a
    # child process, so that SIGTERM and Ctrl-C reach Streamlit itself and nothing is orphaned.
    os.execve(sys.executable, command, {**os.environ, **settings.placeholders()})


def _experiments(settings: Settings, args: argparse.Namespace) -> int:
    from abtest.experiments import load_experiments
    from abtest.splitter import Splitter

    config = load_experiments(args.file or settings.experiments_file)
    if args.action == "validate":
        print(config.summary())
    else:
        print(Splitter(config).route(args.user_id, now_ms=args.now_ms).describe())
    return 0


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from model.data import build_catalog, load_movielens_sequences
    from model.train import checkpoint_path, format_metrics, save_checkpoint, train_and_evaluate

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


def _eval(settings: Settings, args: argparse.Namespace) -> int:
    from model.data import build_catalog, load_movielens_sequences
    from model.train import checkpoint_path, evaluate_checkpoint, format_metrics

    path = checkpoint_path(settings.data_dir, args.model, args.seed)
    metrics = evaluate_checkpoint(path, build_catalog(settings), load_movielens_sequences())
    print(f"test:  {format_metrics(metrics)}")
    return 0


def _trainer(settings: Settings, args: argparse.Namespace) -> int:
    import signal
    import threading

    from abtest.experiments import trained_models
    from model.data import build_catalog
    from model.trainer_loop import run_trainer

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        models = list(settings.trainer_model_names) or trained_models(settings.experiments_file)
    report = run_trainer(
        settings, build_catalog(settings), models, stop, args.max_idle, init_from=args.init_from
    )
    for name, versions in report.versions.items():
        last = versions[-1] if versions else "-"
        print(f"{name}: {len(versions)} version(s) published, last {last}")
    print(f"trainer: {report.samples} samples learned, {report.dead_letters} dead-lettered")
    return 0


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from serving.server import run_service

    if args.port is not None:
        settings = load_settings(serve_port=args.port)  # the environment, with the flag on top
    return run_service(settings)


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hymirec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="the embedded Kafka-protocol broker")
    broker.add_argument("action", choices=["start", "stop", "status"])
    broker.set_defaults(run=_broker)

    features = sub.add_parser("features", help="item features and online user features")
    features.add_argument(
        "action",
        choices=["build", "show", "publish", "serve"],
        help="build: embed, fit, publish; show: users' online rows; publish: the saved codebook "
        "for clients; serve: Feast's HTTP feature server (read-only)",
    )
    features.add_argument("users", nargs="*", help="user ids (for show)")
    features.add_argument("--host", default="127.0.0.1", help="serve: address to bind")
    features.add_argument("--port", type=int, default=6566, help="serve: port (Feast's default)")
    features.add_argument("--workers", type=int, default=1, help="serve: gunicorn workers")
    features.set_defaults(run=_features)

    worker = sub.add_parser("worker", help="run the Faust stream worker in the foreground")
    worker.add_argument("--loglevel", default="info", choices=["debug", "info", "warning"])
    worker.set_defaults(run=_worker)

    replay = sub.add_parser("replay", help="replay MovieLens-100K ratings into the events topic")
    replay.add_argument("--limit", type=int, default=0, help="first N ratings only (0: all)")
    replay.add_argument("--rate", type=float, default=None, help="events per second (default: max)")
    replay.set_defaults(run=_replay)

    demo = sub.add_parser(
        "demo", help="the whole loop on embedded defaults: an A/B test of HyMiRec vs SASRec"
    )
    demo.add_argument(
        "--duration", type=float, default=120.0, help="s of simulated traffic (longer: more power)"
    )
    demo.add_argument(
        "--warm", type=int, default=100_000, help="MovieLens-100K ratings replayed first"
    )
    demo.add_argument(
        "--scenario",
        default="hymirec-vs-sasrec",
        choices=list(SCENARIOS),
        help="the experiment's arms (aa: SASRec in both; all-models: every model, 20%% each)",
    )
    demo.add_argument("--all-models", action="store_true", help="the same as --scenario all-models")
    demo.add_argument("--exit", action="store_true", help="do not keep the dashboard up at the end")
    demo.add_argument("--timeout", type=float, default=900.0, help="give up a step after this")
    demo.set_defaults(run=_demo)

    sink = sub.add_parser("sink", help="copy the events topic into ClickHouse (foreground)")
    sink.add_argument(
        "--max-idle", type=float, default=None, help="stop after this many s without events"
    )
    sink.add_argument(
        "--publish-readouts",
        action="store_true",
        help="also write the dashboard's readout snapshots every HYMIREC_READOUT_PUBLISH_S s",
    )
    sink.set_defaults(run=_sink)

    readout = sub.add_parser("readout", help="an experiment's metrics, effects and SRM check")
    readout.add_argument(
        "experiment", nargs="?", default=None, help="experiment name, as logged in impressions"
    )
    readout.add_argument(
        "--control",
        default=None,
        help='control variant (default: "control" if present, else the first by name)',
    )
    readout.add_argument("--notes", default=None, help="e.g. which training policy ran")
    readout.add_argument(
        "--publish",
        action="store_true",
        help="write every experiment's snapshot for the dashboard, in a loop (needs ClickHouse "
        "to itself on chdb: there, prefer `hymirec sink --publish-readouts`)",
    )
    readout.add_argument(
        "--every", type=float, default=None, help="seconds between publishes (default: settings)"
    )
    readout.add_argument("--once", action="store_true", help="with --publish: publish once")
    readout.set_defaults(run=_readout)

    dashboard = sub.add_parser("dashboard", help="the Streamlit experiment dashboard (foreground)")
    dashboard.add_argument(
        "--port", type=int, default=None, help="default: HYMIREC_DASHBOARD_PORT (8501)"
    )
    dashboard.set_defaults(run=_dashboard)

    experiments = sub.add_parser("experiments", help="check the experiments file, route a user")
    experiments_sub = experiments.add_subparsers(dest="action", required=True)
    validate = experiments_sub.add_parser("validate", help="validate and summarise the file")
    assign = experiments_sub.add_parser("assign", help="the model and variants a user gets")
    assign.add_argument("user_id", type=int)
    assign.add_argument("--now-ms", type=int, default=None, help="epoch ms (default: now)")
    for command in (validate, assign):
        command.add_argument("--file", type=Path, default=None, help="default: the settings' file")
    experiments.set_defaults(run=_experiments)

    models = "popular, sasrec, hstu, hymirec, persrec or fuxi_mme (model/registry.py)"
    train = sub.add_parser("train", help="train a model offline on ML-100K and save it")
    train.add_argument("--model", required=True, help=models)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=30, help="at most; early stopping decides")
    train.set_defaults(run=_train)

    trainer = sub.add_parser(
        "trainer", help="learn online from the training-samples topic; publish model versions"
    )
    trainer.add_argument(
        "--models",
        default=None,
        help="comma-separated (default: HYMIREC_TRAINER_MODELS, "
        "else the models the experiments serve)",
    )
    trainer.add_argument(
        "--max-idle", type=float, default=None, help="stop after this many s without samples"
    )
    trainer.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="offline checkpoints (<model>.pt) for models with no version yet; the samples "
        "already in the topic count as learned by them",
    )
    trainer.set_defaults(run=_trainer)

    evaluate = sub.add_parser("eval", help="test metrics of a model saved by `hymirec train`")
    evaluate.add_argument("--model", required=True, help=models)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(run=_eval)
    simulate = sub.add_parser(
        "simulate", help="simulated multi-interest users request lists and click (foreground)"
    )
    simulate.add_argument(
        "--duration", type=float, default=None, help="simulated seconds (default: until Ctrl-C)"
    )
    simulate.add_argument(
        "--population",
        choices=["movielens", "text-clusters"],
        default=None,
        help="default: HYMIREC_SIM_POPULATION (movielens: the 943 ML-100K users)",
    )
    simulate.add_argument(
        "--users",
        type=int,
        default=None,
        help="text-clusters population only (default: HYMIREC_SIM_USERS)",
    )
    simulate.add_argument(
        "--rate", type=float, default=None, help="requests/s (default: HYMIREC_SIM_RATE_PER_S)"
    )
    simulate.add_argument("--seed", type=int, default=None, help="default: HYMIREC_SIM_SEED")
    simulate.add_argument("--k", type=int, default=10, help="items per request")
    simulate.add_argument(
        "--unpaced", action="store_true", help="send requests back to back, not at --rate"
    )
    simulate.set_defaults(run=_simulate)

    serve = sub.add_parser(
        "serve", help="the recommendation API (foreground; prints a line when it is ready)"
    )
    serve.add_argument("--port", type=int, default=None, help="default: HYMIREC_SERVE_PORT (8000)")
    serve.set_defaults(run=_serve)
    return parser


def _quiet_libraries() -> None:
    """Library deprecation noise (kafka-python reads its protocol schemas through
    ``importlib.resources.read_text``) is the libraries' business, not the user's: filtered here,
    at the entry point, never in the packages, and only for those modules."""
    for module in (r"kafka(\..*)?", r"importlib\.resources(\..*)?", r"aiokafka(\..*)?"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for noisy in ("feast", "faust", "mode", "urllib3", "sentence_transformers", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # kafka-python warns about its own event loop timing under load; errors still show.
        for noisy in ("kafka", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        settings = load_settings()
        return int(args.run(settings, args))
    except HymirecError as exc:
        print(f"hymirec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hymirec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
