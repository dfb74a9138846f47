"""``cag serve``: an OpenAI-compatible HTTP server whose prompt caches live in the store."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from . import ui
from .options import HomeOpt, ModelOpt, QuantizeOpt, StoreOpt, ThreadsOpt


def serve_command(
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; the default answers this machine only."),
    port: int = typer.Option(8000, "--port", "-p", min=1, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="CAG_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' on every /v1 route (never printed or logged).",
    ),
    cache_ram: str = typer.Option("2GB", "--cache-ram", help="Memory for restored KV caches, e.g. 512MB or 4GB; least recently used go first."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Requests on one context that decode together; more wait their turn."),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="Most new tokens a request may ask for (also its default)."),
    chunk_size: int = typer.Option(512, "--chunk-size", min=16, help="Tokens per prefill step."),
    quantize: Optional[str] = QuantizeOpt,
    threads: Optional[int] = ThreadsOpt,
    home: Optional[Path] = HomeOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Serve the model and every knowledge base in the store over the OpenAI API (chat, completions, models)."""
    import uvicorn

    import cag
    from cag.knowledge import open_store
    from cag.server import ServerConfig, WorkerConfig, create_app
    from cag.server.worker import base_model_id

    ram = ui.parse_size(cache_ram)
    _log_to_stderr()
    with ui.one_line_errors():
        with ui.status("Loading model…"):
            lm = cag.load_model(model, home=home, quantize=quantize, threads=threads)
        opened = open_store(home, store)
        where = str(getattr(opened, "root", None) or opened)
        getattr(opened, "close", lambda: None)()
    config = ServerConfig(api_key=api_key or None, max_tokens=max_tokens,
                          worker=WorkerConfig(cache_ram=ram, max_batch=max_batch, chunk_size=chunk_size))
    app = create_app(lm, lambda: open_store(home, store), config)
    _banner(host, port, base_model_id(lm), where, bool(api_key))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=60, lifespan="on"))
    _stop_signals_end_cleanly()
    server.run()  # SIGTERM / Ctrl-C: stop accepting, finish the requests in flight, write pending caches
    if not server.started:
        ui.fail(f"the server did not start on {host}:{port} (see the line above)")


def _stop_signals_end_cleanly() -> None:
    """uvicorn raises the stop signal again once it has shut down gracefully, which would end the
    process as killed by it; the stop asked for is done by then, so it ends as a clean exit (0)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


def _log_to_stderr() -> None:
    """One line per request from cag.server, and uvicorn's own start and stop lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name in ("cag.server", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _banner(host: str, port: int, model: str, store: str, with_key: bool) -> None:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}/v1"
    auth = ' -H "Authorization: Bearer $CAG_API_KEY"' if with_key else ""
    ui.out.print(f"[bold green]cag serve[/] {base} · model {model} · store {store}")
    ui.out.print("knowledge bases are models too: GET /v1/models lists them")
    ui.out.print(
        f"try:  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        markup=False,
    )
    if not with_key and not _loopback(host):
        ui.err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it can use it")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
