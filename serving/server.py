"""Running the app under uvicorn: in the foreground (``hymirec serve``) or on a thread (tests)."""

from __future__ import annotations

import gc
import signal
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from core.errors import HymirecError
from core.settings import Settings

__all__ = ["ServerThread", "run_service"]


class _AnnouncingServer(uvicorn.Server):
    """Prints one readiness line once the socket is bound (scripts and tests wait for it)."""

    def __init__(self, config: uvicorn.Config, line: str) -> None:
        super().__init__(config)
        self.line = line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.line, flush=True)


def _config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
    )


def run_service(settings: Settings) -> int:
    """Build the service from the settings and serve it until SIGTERM/SIGINT."""
    from serving.app import create_app
    from serving.service import RecommendationService
    from streaming.kafka_io import ensure_topics

    ensure_topics(settings.kafka)
    service = RecommendationService.build(settings)
    # The ~0.5M objects of the libraries and models loaded so far live as long as the process:
    # out of the collector's reach, a full collection no longer scans them (a pause under load).
    gc.collect()
    gc.freeze()
    models = ", ".join(
        f"{name} {loaded.version}" for name, loaded in sorted(service.pool.current().items())
    )
    experiments = ", ".join(e.name for e in service.splitter.config.experiments) or "none"
    line = (
        f"recommendation service ready on http://{settings.serve.host}:{settings.serve.port} "
        f"(models: {models or 'none published yet, serving popularity'}; "
        f"experiments: {experiments})"
    )
    server = _AnnouncingServer(
        _config(create_app(service), settings.serve.host, settings.serve.port), line
    )
    # uvicorn shuts down gracefully on SIGTERM, restores the previous handler and raises the
    # signal again; with this no-op handler the process then exits 0, like the other services.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:
        raise HymirecError(
            f"the service could not listen on {settings.serve.host}:{settings.serve.port} "
            "(port in use?); set HYMIREC_SERVE_PORT"
        )
    return 0


class ServerThread:
    """Serve an app with uvicorn on a background thread (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = uvicorn.Server(_config(app, host, port))  # off the main thread, uvicorn
        # installs no signal handlers
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        servers = self.server.servers
        return int(servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise HymirecError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
