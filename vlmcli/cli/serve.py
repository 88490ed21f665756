"""`vlm serve`: an OpenAI-compatible HTTP server (POST /v1/chat/completions, GET /v1/models,
GET /health) over one loaded model, with continuous batching."""

from __future__ import annotations

import ipaddress
import signal
from typing import Annotated, Optional

import typer

from vlmcli.cli import options
from vlmcli.cli.common import load_pipeline, set_max_image_pixels
from vlmcli.cli.console import err_console, notice, state
from vlmcli.errors import UsageError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def serve(
    model: options.Model = options.DEFAULT_MODEL,
    mmproj: options.Mmproj = None,
    backend: options.BackendName = "auto",
    host: Annotated[str, typer.Option("--host", metavar="ADDRESS", help="Address to listen on; the default takes local connections only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, metavar="PORT", help="Port to listen on.")] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", envvar="VLM_API_KEY", show_envvar=True, metavar="KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests."),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, metavar="N", help="Most requests decoded together in one batch.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, metavar="N", help="Most requests waiting for a place in the batch; more are refused with 503.")] = 32,
    max_tokens_default: Annotated[int, typer.Option("--max-tokens-default", min=1, metavar="N", help="Most tokens to generate when a request does not say.")] = 256,
    allow_local_files: Annotated[bool, typer.Option("--allow-local-files", help="Accept image URLs naming files on this machine (file:// or a path).")] = False,
    grace_period: Annotated[float, typer.Option("--grace-period", min=0.0, metavar="SECONDS", help="On Ctrl-C or SIGTERM: how long running requests may take to finish before they are cancelled.")] = 10.0,
    max_tiles: options.MaxTiles = None,
    max_image_pixels: options.MaxImagePixels = None,
    threads: options.Threads = None,
    quiet: options.Quiet = False,
) -> None:
    """Serve the model over HTTP, OpenAI-compatible (chat completions with images, streaming)."""
    state.quiet = quiet
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty")
    set_max_image_pixels(max_image_pixels)
    import uvicorn

    from vlmcli.server.app import create_app
    from vlmcli.server.engine import Engine

    pipe = load_pipeline(model, backend, max_tiles, mmproj=mmproj, threads=threads)
    engine = Engine(pipe, max_batch=max_batch, max_queue=max_queue)
    app = create_app(
        pipe, engine, model_id=model, api_key=api_key, allow_local_files=allow_local_files, max_tokens_default=max_tokens_default
    )
    if not _is_loopback(host) and api_key is None:
        err_console().print(
            f"[bold yellow]warning:[/] listening on {host} without an API key: anyone who can reach this "
            "machine can use the model (set --api-key or VLM_API_KEY)",
            highlight=False,
            soft_wrap=True,
        )
    shown = f"[{host}]" if ":" in host else host
    notice(f"serving {model} ({pipe.backend.name}, batches of up to {max_batch}) at http://{shown}:{port}/v1 (Ctrl-C stops)")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning" if quiet else "info",
        timeout_graceful_shutdown=grace_period,
        lifespan="on",
    )
    server = _Server(config)
    server.run()
    if server.startup_failed:
        raise UsageError(f"cannot listen on {shown}:{port} (is the port in use?)")
    notice("stopped")


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a Ctrl-C or SIGTERM is a normal stop (exit 0): running
        requests get the grace period, then the rest are cancelled; a second signal stops
        at once. uvicorn would raise the signal again once stopped, which vlm reports as
        interrupted (130) or terminated (143)."""

        startup_failed = False

        def capture_signals(self):
            import contextlib
            import threading

            @contextlib.contextmanager
            def captured():
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            return captured()

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.should_exit and not self.started:
                self.startup_failed = True

    return Server


def _Server(config):
    return _server_class()(config)
