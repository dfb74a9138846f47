"""``cag``: build a knowledge cache once, answer many questions from it, manage the store."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.table import Table

from . import ui
from .options import HomeOpt, JsonOpt, KvDtypeOpt, ModelOpt, QuantizeOpt, StoreOpt, ThreadsOpt

app = typer.Typer(
    name="cag",
    help=(
        "Cache-Augmented Generation: prefill documents once into a KV cache stored as safetensors, "
        "then answer many questions against the restored cache. Caches live in $CAG_HOME/store "
        "(default ~/.cache/cag/store), or in the store that --store / $CAG_STORE names (e.g. redis://HOST:6379/0)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _store(home: Optional[Path], url: Optional[str]):
    from cag.stores import open_store

    return open_store(url, home)


def _where(home: Optional[Path], url: Optional[str]) -> str:
    """The store's URL as it may be printed (no password)."""
    from cag.stores import default_url, redact

    return redact(url or default_url(home))


@app.command()
def build(
    inputs: List[str] = typer.Argument(..., help="Documents: files, folders (recursive), globs, or - for stdin."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Name of the cache (a label on its content key)."),
    model: Optional[str] = ModelOpt,
    chunk_size: int = typer.Option(512, "--chunk-size", min=16, help="Tokens per prefill step."),
    quantize: Optional[str] = QuantizeOpt,
    kv_dtype: Optional[str] = KvDtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    json_out: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
    store: Optional[str] = StoreOpt,
    passages: bool = typer.Option(False, "--passages", help="Cache each passage (paragraphs, up to --passage-tokens) on its "
                                                            "own, to compose the top-k per question: cag ask --top-k."),
    passage_tokens: int = typer.Option(256, "--passage-tokens", min=16, help="With --passages: most tokens of text per passage."),
) -> None:
    """Prefill documents once and store their KV cache; reuses the longest prefix already stored."""
    import cag
    from cag.stores import validate_name

    if passages:
        from .passages import build_collection

        return build_collection(inputs, name, model, chunk_size, quantize, kv_dtype, threads, json_out, home, passage_tokens,
                                store)
    with ui.one_line_errors():
        if name is not None:
            validate_name(name)
        documents = cag.load_documents(inputs)  # bad input fails here, before the model loads
        with ui.status("Loading model (the first run converts the embedded model, ~30 s)…", quiet=json_out):
            lm = cag.load_model(model, home=home, quantize=quantize, threads=threads)
        with ui.token_progress("Prefill", quiet=json_out) as progress:
            kb = cag.build(documents, name=name, model=lm, home=home, store=store, chunk_size=chunk_size,
                           on_progress=progress, kv_dtype=kv_dtype)
    r = kb.report
    if json_out:
        ui.print_json({"name": r.name, "key": r.key, "tokens": r.tokens, "bytes": r.bytes, "seconds": round(r.seconds, 3),
                       "reused_tokens": r.reused_tokens, "prefilled_tokens": r.prefilled_tokens,
                       "kv_dtype": kb.entry.kv_dtype, "sources": r.sources})
        return
    label = r.name or r.key[:12]
    ui.out.print(
        f"[bold green]built[/] {label}: {r.tokens:,} tokens from {len(r.sources)} document(s), "
        f"{ui.human_size(r.bytes)} stored, {r.seconds:.1f} s "
        f"(reused {r.reused_tokens:,}, prefilled {r.prefilled_tokens:,}); key {r.key[:12]}"
    )
    ui.out.print(f"ask it:  cag ask --cache {label} \"your question\"" + (f" --store {_where(home, store)}" if store else ""))


def _read_questions(questions: List[str], questions_file: Optional[Path]) -> List[str]:
    found = list(questions)
    if questions_file is not None:
        try:
            text = sys.stdin.read() if str(questions_file) == "-" else questions_file.read_text(encoding="utf-8")
        except OSError as exc:
            ui.fail(f"cannot read questions file {questions_file}: {exc.strerror or exc}")
        found += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        ui.fail("no question given: pass questions as arguments or --questions FILE")
    return found


@app.command()
def ask(
    questions: List[str] = typer.Argument(None, help="Questions to answer."),
    cache: str = typer.Option(..., "--cache", "-c", help="Name (or key) of a cache made by `cag build`."),
    questions_file: Optional[Path] = typer.Option(None, "--questions", "-q", help="File with one question per line (- for stdin)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to use (default: the one that built the cache)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy (reproducible); above 0 samples."),
    seed: int = typer.Option(0, "--seed", help="Random seed when sampling."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Baseline: re-prefill the whole prompt for every question."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1,
                                   help="Questions decoded together against the cache (1: one by one, each answer streamed)."),
    quantize: Optional[str] = QuantizeOpt,
    threads: Optional[int] = ThreadsOpt,
    json_out: bool = JsonOpt,
    home: Optional[Path] = HomeOpt,
    store: Optional[str] = StoreOpt,
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", min=1, help="From a collection built with --passages: "
                                                                             "compose this many passages (default 3)."),
    retriever: str = typer.Option("bm25", "--retriever", help="With --top-k: bm25 or dense picks the passages."),
    recompute: int = typer.Option(0, "--recompute", min=0, help="With --top-k: re-run the first R tokens of each passage "
                                                                "with the passages before it in view (EPIC-style)."),
) -> None:
    """Answer questions against a stored cache: several at once in batches, or one by one, streamed."""
    import cag
    from cag.model import set_threads

    from .passages import ask_collection, wants_collection

    todo = _read_questions(questions or [], questions_file)
    if wants_collection(cache, home, top_k, retriever, recompute, store):
        return ask_collection(todo, cache, model, max_new_tokens, temperature, seed, top_k, retriever, recompute,
                              no_cache, quantize, threads, json_out, home, store)
    with ui.one_line_errors():
        with ui.status("Loading model…", quiet=json_out):
            set_threads(threads)
            kb = cag.load(cache, model=model, home=home, store=store, quantize=quantize)
            if not no_cache:
                kb.restore()  # refused here, before any output, if the cache is damaged
        batched = batch_size > 1 and len(todo) > 1 and not no_cache
        if batched:
            with ui.status(f"Answering {len(todo)} questions, {min(batch_size, len(todo))} at a time…", quiet=json_out):
                answers = iter(kb.ask_many(todo, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                           temperature=temperature, seed=seed))
        for question in todo:
            if not json_out:
                ui.out.print(f"[bold cyan]Q:[/] {question}")
                ui.out.print("[bold green]A:[/] ", end="")
            if batched:
                answer = next(answers)
                if not json_out:
                    sys.stdout.write(answer.text)
            else:
                stream = None if json_out else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
                answer = kb.ask(question, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                use_cache=not no_cache, on_text=stream)
            if json_out:
                row = {"cache": cache, "mode": "no-cache" if no_cache else "cache", **answer.to_dict()}
                ui.print_json({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            else:
                ui.out.print()
                together = f" · batch of {answer.batch}" if answer.batch > 1 else ""
                ui.out.print(
                    f"[dim]{answer.new_tokens} tokens · first token {answer.ttft_s:.2f} s · total {answer.total_s:.2f} s{together} · "
                    f"reused {answer.reused_tokens:,} / prefilled {answer.prefilled_tokens:,} prompt tokens[/]\n"
                )


@app.command("ls")
def list_caches(json_out: bool = JsonOpt, home: Optional[Path] = HomeOpt, store: Optional[str] = StoreOpt) -> None:
    """List stored caches: name, key, model, tokens, size, created, last used, hits."""
    with ui.one_line_errors():
        entries = _store(home, store).entries()
    if json_out:
        for e in entries:
            ui.print_json(_entry_dict(e))
        return
    if not entries:
        ui.out.print(f"no caches yet in {_where(home, store)}: build one with `cag build DOCS --name NAME`")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), caption=_where(home, store), caption_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("key", no_wrap=True)
    table.add_column("model", overflow="ellipsis", no_wrap=True, max_width=16)
    for column in ("tokens", "size", "created", "last used", "hits"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("tokens", "size", "hits") else "left")
    for e in entries:
        table.add_row(", ".join(e.names) or "–", e.key[:8], Path(e.model_name).name, f"{e.tokens:,}",
                      ui.human_size(e.bytes), _when(e.created), _when(e.last_used), str(e.hits))
    ui.out.print(table)


@app.command()
def info(cache: str = typer.Argument(..., help="Name or key of a cache."), json_out: bool = JsonOpt,
         home: Optional[Path] = HomeOpt, store: Optional[str] = StoreOpt) -> None:
    """Show a cache's metadata, sources, blocks and fingerprint."""
    with ui.one_line_errors():
        entry = _store(home, store).resolve(cache)
    data = {**_entry_dict(entry), "store": _where(home, store)}
    if json_out:
        ui.print_json(data)
        return
    for key, value in data.items():
        if key == "sources":
            ui.out.print(f"[bold]{key}[/]:")
            for source in value:
                ui.out.print(f"  - {source}")
        else:
            ui.out.print(f"[bold]{key}[/]: {value}")


@app.command()
def rm(caches: List[str] = typer.Argument(..., help="Names or keys to remove."), home: Optional[Path] = HomeOpt,
       store: Optional[str] = StoreOpt) -> None:
    """Remove caches by name (the entry goes once no name points to it) or by key."""
    with ui.one_line_errors():
        from cag.passages import is_collection, remove_collection

        opened = _store(home, store)
        for cache in caches:
            removed = remove_collection(cache, store=opened) if is_collection(cache, store=opened) else opened.remove(cache)
            freed = sum(e.bytes for e in removed)
            ui.out.print(f"removed {cache}" + (f" ({ui.human_size(freed)} freed)" if removed else " (entry kept: other names point to it)"))


@app.command()
def gc(
    max_size: str = typer.Option(..., "--max-size", help="Keep the store at most this big, e.g. 2GB; least recently used go first."),
    home: Optional[Path] = HomeOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Remove least-recently-used caches until the store fits in --max-size."""
    limit = ui.parse_size(max_size)
    with ui.one_line_errors():
        removed = _store(home, store).gc(limit)
    for e in removed:
        ui.out.print(f"removed {', '.join(e.names) or e.key[:12]} ({ui.human_size(e.bytes)}, last used {_when(e.last_used)})")
    ui.out.print(f"{len(removed)} cache(s) removed, {ui.human_size(sum(e.bytes for e in removed))} freed")


@app.command()
def verify(json_out: bool = JsonOpt, home: Optional[Path] = HomeOpt, store: Optional[str] = StoreOpt) -> None:
    """Re-hash every cache against the checksum recorded when it was written; quarantine failures, re-index what the index lost."""
    with ui.one_line_errors():
        report = _store(home, store).verify()
    if json_out:
        ui.print_json({"ok": report.ok, "quarantined": [{"item": k, "reason": r} for k, r in report.quarantined],
                       "removed_rows": report.removed_rows, "reindexed": report.reindexed})
    else:
        ui.out.print(f"{len(report.ok)} ok")
        for key in report.reindexed:
            ui.out.print(f"[green]re-indexed[/] {key[:12]}: a valid cache the index had lost")
        for item, reason in report.quarantined:
            ui.out.print(f"[red]quarantined[/] {item}: {reason}")
        for key in report.removed_rows:
            ui.out.print(f"[yellow]dropped[/] index entry {key[:12]}: its file was missing")
    if report.quarantined or report.removed_rows:
        raise typer.Exit(1)


def _entry_dict(e) -> dict:
    return {"names": list(e.names), "key": e.key, "model": e.model_name, "fingerprint": e.fingerprint,
            "kv_dtype": e.kv_dtype, "tokens": e.tokens, "boundary": e.tokens, "blocks": e.blocks, "bytes": e.bytes,
            "created": _iso(e.created), "last_used": _iso(e.last_used), "hits": e.hits, "sources": list(e.sources)}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def _when(ts: float) -> str:
    ago = time.time() - ts
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if ago >= seconds:
            return f"{ago / seconds:.0f}{unit} ago"
    return "just now"


# Commands defined in their own modules (one line each).
from .evaluate import eval_command; app.command("eval")(eval_command)  # noqa: E402,E702
from .bench import bench as _bench; app.command()(_bench)  # noqa: E402,E702
from .prompt import prompt_command; app.command("prompt")(prompt_command)  # noqa: E402,E702
from .serve import serve_command; app.command("serve")(serve_command)  # noqa: E402,E702


def main() -> None:
    app()


if __name__ == "__main__":
    main()
