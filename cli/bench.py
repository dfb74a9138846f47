"""``cag bench``: time to first token with and without the cache, per-question latency, batching, llama.cpp."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import ui
from .options import HomeOpt, KvDtypeOpt, ModelOpt, QuantizeOpt, StoreOpt, ThreadsOpt


@dataclass(frozen=True)
class _Plan:
    lengths: str
    repeats: int
    questions: int | None  # the first N bundled questions; None for all


QUICK = _Plan(lengths="1024,4096", repeats=2, questions=4)
FULL = _Plan(lengths="512,1024,2048,4096", repeats=3, questions=None)


def bench(
    docs: Optional[List[str]] = typer.Argument(None, help="Documents to cut contexts from (default: the bundled corpus)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", "-l",
                                          help="Context lengths in tokens, comma-separated (1k = 1024); clipped to the model's "
                                               f"window. Default: {QUICK.lengths} ({FULL.lengths} with --full)."),
    questions: Optional[Path] = typer.Option(None, "--questions", "-q", help="File with one question per line (default: bundled)."),
    model: Optional[str] = ModelOpt,
    quantize: Optional[str] = QuantizeOpt,
    kv_dtype: Optional[str] = KvDtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Most tokens per answer in the per-question timings."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Questions per batch in the batched timing."),
    peer: Optional[str] = typer.Option(None, "--peer", help="Also time llama.cpp ('llamacpp') running the embedded model's GGUF file on the same context "
                                       "and questions at the same thread count, alternating with cag question by question; "
                                       "needs `pip install llama-cpp-python`."),
    repeats: Optional[int] = typer.Option(None, "--repeats", "-r", min=1,
                                          help=f"Runs per measurement; the median is reported. Default: {QUICK.repeats} "
                                               f"({FULL.repeats} with --full)."),
    full: bool = typer.Option(False, "--full", help="The whole table: every length, more repeats, every bundled question "
                                                    "(tens of minutes on 2 cores; the default is a quick run of a few minutes)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per context length on stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of time to first token against context length."),
    home: Optional[Path] = HomeOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Measure time to first token (re-prefill, restored cold/warm, in memory), per-question latency,
    batched asking, restore speed and cache size; optionally against llama.cpp."""
    import cag
    from cag.measure import bench as lib
    from cag.stores import open_store
    from cag.model import set_threads

    plan = FULL if full else QUICK
    wanted = _parse_lengths(lengths or plan.lengths)
    repeats = repeats or plan.repeats
    with ui.one_line_errors():
        asked = lib.read_questions(questions) if questions is not None else lib.bundled_questions()[: plan.questions]
        documents = cag.load_documents(docs) if docs else None
        with ui.status("Loading model (the first run converts the embedded model, ~30 s)…", quiet=json_out):
            used = set_threads(threads)
            lm = cag.load_model(model, home=home, quantize=quantize)
            # Quantized weights change answers: the full-precision model says how many.
            reference = cag.load_model(model, home=home, quantize="none") if lm.quantize else None
        if not json_out:
            ui.err.print(f"{used} torch thread{'s' if used > 1 else ''}, {len(asked)} questions, {repeats} repeat(s)"
                         f"{'' if full or lengths else '; --full for the whole table'}")
        fitted = lib.fit_lengths(lm, wanted, asked, max_new_tokens)
        if not json_out and max(wanted) > max(fitted):
            ui.err.print(f"[yellow]note:[/] lengths above {max(fitted):,} tokens clipped to fit the model's "
                         f"{lm.max_context:,}-token window with a question and its answer")
        with _progress(quiet=json_out) as on_progress:
            rows = lib.run_bench(lm, fitted, asked, documents=documents, home=home, store=open_store(store, home),
                                 max_new_tokens=max_new_tokens, repeats=repeats, kv_dtype=kv_dtype,
                                 batch_size=batch_size, peer=peer, reference=reference,
                                 on_progress=on_progress)
        if plot is not None:
            lib.plot_rows(rows, plot)
    if json_out:
        for row in rows:
            ui.print_json(row.to_dict())
        return
    for table in _tables(rows, lib.machine_info()):
        ui.out.print(table)
    if plot is not None:
        ui.out.print(f"plot written to {plot}")


def _parse_lengths(text: str) -> list[int]:
    lengths = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)\s*([kK]?)", part)
        if not match or int(match.group(1)) <= 0:
            raise typer.BadParameter(f"cannot read context length {part!r}: use e.g. 512,1024,2k", param_hint="--lengths")
        lengths.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    if not lengths:
        raise typer.BadParameter("give at least one context length, e.g. 512,1024", param_hint="--lengths")
    return lengths


class _progress:
    """A rich progress bar fed by run_bench's (what, done, total) callback."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=ui.err, transient=True)

    def __enter__(self):
        if self.quiet:
            return None
        self.bar.__enter__()
        task = self.bar.add_task("benchmark", total=None)
        return lambda what, done, total: self.bar.update(task, description=what, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if not self.quiet:
            self.bar.__exit__(*exc)


def _seconds(value: float) -> str:
    return f"{value * 1000:,.0f} ms" if value < 1 else f"{value:,.2f} s"


def _mb_s(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _tables(rows, machine: dict) -> list[Table]:
    """Two tables that each fit an 80-column terminal: the waits, then the cache on disk."""
    first = rows[0]
    cold_note = "" if all(r.cold_dropped for r in rows) else "; * cold run found the file still in the page cache"
    ttft = Table(title="time to first token", caption=(
        "full: re-prefill of context and question; cold, warm: cache restored from disk with the file "
        "out of / in the page cache; in memory: cache already loaded; speed-up: full / warm. "
        f"{first.model} on {first.device} ({machine['cpu']}, {machine['cores']} cores, {first.threads} torch threads); "
        f"medians of {first.repeats} run(s){cold_note}"))
    for header in ("context", "full", "cold", "warm", "in memory", "speed-up"):
        ttft.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        ttft.add_row(
            f"{r.context_tokens:,}",
            _seconds(r.ttft_full_s),
            _seconds(r.ttft_restored_cold_s) + ("" if r.cold_dropped else " *"),
            _seconds(r.ttft_restored_warm_s),
            _seconds(r.ttft_in_memory_s),
            f"{r.speedup_warm:,.1f}×",
        )
    disk = Table(title="cache on disk", caption=(
        f"stored as {first.kv_dtype}; tok/s: prefill speed of the full re-prefill; B/token: bytes on disk per context "
        "token; restore, cold: MB/s (10^6 bytes) of a warm and a cold restore; raw, raw cold: MB/s of a plain "
        "safetensors read of the same file, warm and cold"))
    for header in ("tokens", "tok/s", "size", "B/token", "restore", "cold", "raw", "raw cold"):
        disk.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        disk.add_row(f"{r.context_tokens:,}", f"{r.prefill_tok_s:,.0f}", ui.human_size(r.cache_bytes),
                     f"{r.bytes_per_token:,.0f}", _mb_s(r.restore_mb_s), _mb_s(r.restore_cold_mb_s),
                     _mb_s(r.raw_read_mb_s), _mb_s(r.raw_read_cold_mb_s))
    return [ttft, *_answers_tables(rows), disk]


def _answers_tables(rows) -> list[Table]:
    """Per question (restore + question + answer) and batched; then the peer, where there is one."""
    first = rows[0]
    agreement = first.identical_to_full_precision is not None
    table = Table(title="answering", caption=(
        f"per question: each of {first.questions} questions alone, cache restored warm from the store, up to "
        f"{first.max_new_tokens} new tokens; first: restore + question prefill; tok/s: decoding after the first token; "
        f"batched: throughput of all {first.questions} in batches of {first.batch_size} over one by one; same: "
        "share of batched answers identical to one-by-one"
        + f"; GB/s: bytes a decode step reads (weights and context KV) x tok/s, and its share of this machine's "
          f"{first.memory_gb_s:,.1f} GB/s copy bandwidth"
        + (f"; agrees: share of answers identical to full precision ({'float32 weights' if ':' in first.model else first.kv_dtype + ' stored'})"
           if agreement else "")))
    for header in ["context", "first", "tok/s", "GB/s", "per question", "batched", "same"] + (["agrees"] if agreement else []):
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        cells = [f"{r.context_tokens:,}", _seconds(r.per_question_ttft_s), f"{r.decode_tok_s:,.1f}",
                 f"{r.decode_gb_s:,.1f} ({r.decode_bandwidth_share:.0%})", _seconds(r.per_question_s), f"{r.batch_speedup:,.1f}×", f"{r.batch_identical:.0%}"]
        table.add_row(*cells + ([f"{r.identical_to_full_precision:.0%}"] if agreement else []))
    if first.peer is None:
        return [table]
    peer = Table(title=f"per question, cag and {first.peer}", caption=(
        f"{first.peer}: the embedded model's GGUF file, the same context and question tokens, {first.threads} "
        f"thread(s), its state restored from memory, alternated with cag question by question; cag: {first.model} "
        f"with a {first.kv_dtype} cache; first: restore + question prefill; ×: cag's time / {first.peer}'s; "
        f"same: share of its answers token-identical to cag's"))
    for header in ("context", "cag", "first", "tok/s", first.peer, "first", "tok/s", "×", "same"):
        peer.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        peer.add_row(f"{r.context_tokens:,}", _seconds(r.per_question_s), _seconds(r.per_question_ttft_s),
                     f"{r.decode_tok_s:,.1f}", _seconds(r.peer_per_question_s), _seconds(r.peer_ttft_s),
                     f"{r.peer_decode_tok_s:,.1f}", f"{r.vs_peer:.2f}", f"{r.peer_identical:.0%}")
    return [table, peer]
