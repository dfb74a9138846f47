"""Terminal helpers shared by the commands: consoles, progress, errors, sizes."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from cag.errors import CagError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "– tok/s", style="cyan")


@contextlib.contextmanager
def token_progress(description: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over tokens (done/total, tokens/s, ETA); yields the callback to feed it."""
    if quiet:
        yield lambda done, total: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TokensPerSecond(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = None

    def update(done: int, total: int) -> None:
        # Started on the first report, so input errors found before any prefill print alone.
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(description, total=total, completed=done)
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            progress.stop()


@contextlib.contextmanager
def status(message: str, quiet: bool = False) -> Iterator[None]:
    if quiet:
        yield
        return
    with err.status(message):
        yield


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except CagError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        fail("interrupted; nothing half-written was kept", code=130)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def parse_size(text: str) -> int:
    """'2GB', '500M', '1.5GiB', '1048576' -> bytes (binary units)."""
    from cag.stores.registry import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{n} B"
