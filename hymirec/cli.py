"""The ``hymirec`` command: parses the command line and runs a sub-command
(``hymirec.commands``); holds no logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from core.errors import HymirecError
from core.settings import load_settings
from hymirec import commands
from hymirec.scenarios import SCENARIOS

__all__ = ["main"]


def _add_pipeline(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Sub-commands: the embedded broker, features, the stream worker, replays and the demo."""
    broker = sub.add_parser("broker", help="the embedded Kafka-protocol broker")
    broker.add_argument("action", choices=["start", "stop", "status"])
    broker.set_defaults(run=commands.broker)
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
    features.set_defaults(run=commands.features)
    worker = sub.add_parser("worker", help="run the Faust stream worker in the foreground")
    worker.add_argument("--loglevel", default="info", choices=["debug", "info", "warning"])
    worker.set_defaults(run=commands.worker)
    replay = sub.add_parser("replay", help="replay MovieLens-100K ratings into the events topic")
    replay.add_argument("--limit", type=int, default=0, help="first N ratings only (0: all)")
    replay.add_argument("--rate", type=float, default=None, help="events per second (default: max)")
    replay.set_defaults(run=commands.replay)
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
    demo.set_defaults(run=commands.demo)


def _add_analytics(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Sub-commands: the ClickHouse sink, readouts, the dashboard and the experiments file."""
    sink = sub.add_parser("sink", help="copy the events topic into ClickHouse (foreground)")
    sink.add_argument(
        "--max-idle", type=float, default=None, help="stop after this many s without events"
    )
    sink.add_argument(
        "--publish-readouts",
        action="store_true",
        help="also write the dashboard's readout snapshots every HYMIREC_READOUT_PUBLISH_S s",
    )
    sink.set_defaults(run=commands.sink)
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
    readout.set_defaults(run=commands.readout)
    dashboard = sub.add_parser("dashboard", help="the Streamlit experiment dashboard (foreground)")
    dashboard.add_argument(
        "--port", type=int, default=None, help="default: HYMIREC_DASHBOARD_PORT (8501)"
    )
    dashboard.set_defaults(run=commands.dashboard)
    experiments = sub.add_parser("experiments", help="check the experiments file, route a user")
    experiments_sub = experiments.add_subparsers(dest="action", required=True)
    validate = experiments_sub.add_parser("validate", help="validate and summarise the file")
    assign = experiments_sub.add_parser("assign", help="the model and variants a user gets")
    assign.add_argument("user_id", type=int)
    assign.add_argument("--now-ms", type=int, default=None, help="epoch ms (default: now)")
    for command in (validate, assign):
        command.add_argument("--file", type=Path, default=None, help="default: the settings' file")
    experiments.set_defaults(run=commands.experiments)


def _add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Sub-commands: offline training and evaluation, the online trainer."""
    models = "popular, sasrec, hstu, hymirec, persrec or fuxi_mme (model/zoo.py)"
    train = sub.add_parser("train", help="train a model offline on ML-100K and save it")
    train.add_argument("--model", required=True, help=models)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=30, help="at most; early stopping decides")
    train.set_defaults(run=commands.train)
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
    trainer.set_defaults(run=commands.trainer)
    evaluate = sub.add_parser("eval", help="test metrics of a model saved by `hymirec train`")
    evaluate.add_argument("--model", required=True, help=models)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(run=commands.evaluate)


def _add_traffic(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Sub-commands: the recommendation service and the simulated users."""
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
    simulate.set_defaults(run=commands.simulate)
    serve = sub.add_parser(
        "serve", help="the recommendation API (foreground; prints a line when it is ready)"
    )
    serve.add_argument("--port", type=int, default=None, help="default: HYMIREC_SERVE_PORT (8000)")
    serve.set_defaults(run=commands.serve)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hymirec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pipeline(sub)
    _add_analytics(sub)
    _add_models(sub)
    _add_traffic(sub)
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
