"""``cag eval``: CAG against sparse and dense RAG and the uncached full prompt, on a QA set."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import ui
from .options import HomeOpt, ModelOpt, StoreOpt

__all__ = ["eval_command"]


def eval_command(
    dataset: str = typer.Argument(..., help="QA set: a .json/.jsonl/.csv/.parquet file, or a Hugging Face dataset name (online)."),
    top_k: str = typer.Option("3", "--top-k", "-k", help="Passages per RAG prompt; a comma list sweeps, e.g. 1,3,5,10."),
    systems: str = typer.Option("cag,bm25,dense,full", "--systems",
                                help="Systems to compare, from cag, bm25, dense, cached-bm25, cached-dense (cached passages "
                                     "composed, beside the same passages prefilled in full), full."),
    recompute: str = typer.Option("0", "--recompute", help="Cached passages: tokens recomputed at the start of each passage; "
                                                           "a comma list sweeps, e.g. 0,16,64."),
    passage_tokens: int = typer.Option(256, "--passage-tokens", min=16, help="Cached passages: most tokens of text per passage."),
    context: Optional[str] = typer.Option(None, "--context", help="Only these context ids (comma list), e.g. small,medium."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Answer at most this many questions."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Most tokens per answer (greedy decoding)."),
    model: Optional[str] = ModelOpt,
    split: Optional[str] = typer.Option(None, "--split", help="Split of a hub dataset (default: test, else validation, else train)."),
    question_field: Optional[str] = typer.Option(None, "--question-field", help="Column holding the question (default: question)."),
    answers_field: Optional[str] = typer.Option(None, "--answers-field", help="Column holding the reference answers (default: answers or answer)."),
    documents_field: Optional[str] = typer.Option(None, "--documents-field", help="Column holding the documents (default: documents, document or context)."),
    context_field: Optional[str] = typer.Option(None, "--context-field", help="Column naming each row's document set (default: context_id)."),
    answers_out: Optional[Path] = typer.Option(None, "--answers-out", help="Also write every answer, scored, to this JSONL file."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per system (and top-k) on stdout."),
    home: Optional[Path] = HomeOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Answer every question with CAG, BM25 RAG, dense RAG and the uncached full prompt; score and time them."""
    import cag
    from cag.measure.evaluate import QAFields, check_systems, load_qa, run_eval, select_items
    from cag.stores import open_store

    ks = _parse_numbers(top_k, "--top-k", 1)
    rs = _parse_numbers(recompute, "--recompute", 0)
    contexts = [c.strip() for c in context.split(",") if c.strip()] if context else None
    fields = QAFields(question=question_field, answers=answers_field, documents=documents_field, context_id=context_field)
    with ui.one_line_errors():
        # Bad input fails here, before the model takes seconds to load.
        chosen = check_systems(systems.split(","))
        items = select_items(load_qa(dataset, split=split, fields=fields), contexts, limit)
        with ui.status("Loading model…", quiet=json_out):
            lm = cag.load_model(model, home=home)
        with _answer_progress(quiet=json_out) as progress:
            report = run_eval(lm, items, top_k=ks, systems=chosen, max_new_tokens=max_new_tokens, home=home,
                              store=open_store(store, home), on_progress=progress, dataset_name=dataset,
                              recompute=rs, passage_tokens=passage_tokens)
    if answers_out is not None:
        _write_answers(answers_out, report)
    if json_out:
        for row in report.systems:
            ui.print_json({"model": report.model, "dataset": report.dataset, "max_new_tokens": report.max_new_tokens,
                           **{k: _round(v) for k, v in row.to_dict().items()}})
        return
    _print_table(report)


def _parse_numbers(text: str, option: str, least: int) -> List[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"cannot read {text!r}: give a number or a comma list such as 1,3,5,10", param_hint=option) from None
    if not numbers or min(numbers) < least:
        raise typer.BadParameter(f"{option.lstrip('-')} must be at least {least}", param_hint=option)
    return numbers


@contextlib.contextmanager
def _answer_progress(quiet: bool) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar over answers on stderr; yields the callback run_eval feeds."""
    if quiet:
        yield lambda done, total, what: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=ui.err,
    )
    with progress:
        task = progress.add_task("Answering", total=None)
        yield lambda done, total, what: progress.update(task, completed=done, total=total, description=what)


def _write_answers(path: Path, report) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            for record in report.answers:
                row = {"model": report.model, **record.to_dict()}
                f.write(json.dumps({k: _round(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
    except OSError as exc:
        ui.fail(f"cannot write answers to {path}: {exc.strerror or exc}")


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


def _print_table(report) -> None:
    composed = any(r.identical_to_prefill is not None for r in report.systems)
    columns = ["system", "EM", "F1", "contains", "similarity", "retrieval s", "generation s", "first token s",
               "prompt tokens", "setup s"] + (["same as prefilled", "KL first token"] if composed else [])
    table = Table(title=f"{report.questions} questions, {report.contexts} context(s), {report.model}, "
                        f"≤{report.max_new_tokens} new tokens, greedy")
    for index, column in enumerate(columns):
        table.add_column(column, no_wrap=index == 0)  # the system's name stays whole; numbers wrap their headers
    for r in report.systems:
        cells = [r.label, f"{r.em:.3f}", f"{r.f1:.3f}", f"{r.contains:.3f}", f"{r.similarity:.3f}", f"{r.retrieval_s:.4f}",
                 f"{r.generation_s:.3f}", f"{r.ttft_s:.3f}", f"{r.prompt_tokens:,.0f}", f"{r.setup_s:.2f}"]
        if composed:
            cells += [f"{r.identical_to_prefill:.0%}" if r.identical_to_prefill is not None else "–",
                      f"{r.kl_first_token:.4f}" if r.kl_first_token is not None else "–"]
        table.add_row(*cells)
    ui.out.print(table)
    cag_row = next((r for r in report.systems if r.system == "cag" and r.identical_to_full is not None), None)
    if cag_row is not None:
        style = "green" if cag_row.identical_to_full == 1.0 else "bold red"
        ui.out.print(f"[{style}]CAG answers identical to the no-cache answers: {cag_row.identical_to_full:.0%}[/]")
    if composed:
        ui.out.print("[dim]cached passages are scored against the same passages prefilled in full: the share of identical "
                     "answers, and KL(prefilled || composed) of the first answer token[/]")
    ui.out.print("[dim]times are means per question; setup is the one-off cache prefill or index build[/]")
