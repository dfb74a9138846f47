"""`cag build --passages` and `cag ask --top-k`: passage collections, composed per question."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from . import ui

__all__ = ["ask_collection", "build_collection", "wants_collection"]


def build_collection(inputs: List[str], name: Optional[str], model: Optional[str], chunk_size: int, quantize: Optional[str],
                     kv_dtype: Optional[str], threads: Optional[int], json_out: bool, home: Optional[Path],
                     passage_tokens: int, store: Optional[str] = None) -> None:
    import cag
    from cag.passages import build_passages

    if name is None:
        ui.fail("--passages needs --name: the collection is asked by name (cag ask --cache NAME --top-k 3 ...)")
    with ui.one_line_errors():
        documents = cag.load_documents(inputs)  # bad input fails here, before the model loads
        with ui.status("Loading model (the first run converts the embedded model, ~30 s)…", quiet=json_out):
            lm = cag.load_model(model, home=home, quantize=quantize, threads=threads)
        with ui.token_progress("Prefill passages", quiet=json_out) as progress:
            collection = build_passages(documents, name, model=lm, home=home, store=store, passage_tokens=passage_tokens,
                                        chunk_size=chunk_size, kv_dtype=kv_dtype, on_progress=progress)
    r = collection.report
    if json_out:
        ui.print_json({"name": r.name, "prefix_key": r.prefix_key, "passages": r.passages, "tokens": r.tokens,
                       "prefix_tokens": r.prefix_tokens, "bytes": r.bytes, "seconds": round(r.seconds, 3),
                       "reused_passages": r.reused_passages, "prefilled_tokens": r.prefilled_tokens,
                       "kv_dtype": collection.prefix_entry.kv_dtype, "sources": r.sources})
        return
    ui.out.print(
        f"[bold green]built[/] {r.name}: {r.passages:,} passages ({r.tokens:,} tokens, at most {passage_tokens} of text "
        f"each) from {len(r.sources)} document(s) after a {r.prefix_tokens:,}-token instruction prefix, "
        f"{ui.human_size(r.bytes)} on disk, {r.seconds:.1f} s (reused {r.reused_passages:,} passages, "
        f"prefilled {r.prefilled_tokens:,} tokens)"
    )
    ui.out.print(f"ask it:  cag ask --cache {r.name} --top-k 3 \"your question\"")


def wants_collection(cache: str, home: Optional[Path], top_k: Optional[int], retriever: str, recompute: int,
                     store: Optional[str] = None) -> bool:
    """Whether `cag ask` composes passages: asked to (--top-k, --retriever, --recompute), or the cache is a collection."""
    if top_k is not None or recompute or retriever != "bm25":
        return True
    from cag.passages import is_collection

    with ui.one_line_errors():
        return is_collection(cache, home=home, store=store)


def ask_collection(todo: List[str], cache: str, model: Optional[str], max_new_tokens: int, temperature: float, seed: int,
                   top_k: Optional[int], retriever: str, recompute: int, no_cache: bool, quantize: Optional[str],
                   threads: Optional[int], json_out: bool, home: Optional[Path], store: Optional[str] = None) -> None:
    from cag.model import set_threads
    from cag.passages import load_passages

    with ui.one_line_errors():
        with ui.status("Loading model…", quiet=json_out):
            set_threads(threads)
            collection = load_passages(cache, model=model, home=home, store=store, quantize=quantize)
            collection.prefix_cache  # refused here, before any output, if the prefix is damaged  # noqa: B018
        for question in todo:
            if not json_out:
                ui.out.print(f"[bold cyan]Q:[/] {question}")
                ui.out.print("[bold green]A:[/] ", end="")
            stream = None if json_out else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
            answer = collection.ask(question, top_k=top_k or 3, retriever=retriever, recompute=recompute,
                                    max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                    use_cache=not no_cache, on_text=stream)
            if json_out:
                row = {"cache": cache, "mode": "no-cache" if no_cache else "composed", **answer.to_dict()}
                ui.print_json({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
                continue
            ui.out.print()
            sources = ", ".join(f"{p['source']} #{p['index']}" for p in answer.passages)
            how = "prefilled in full" if no_cache else f"composed, {answer.recomputed_tokens:,} tokens recomputed"
            ui.out.print(
                f"[dim]{answer.new_tokens} tokens · first token {answer.ttft_s:.2f} s · total {answer.total_s:.2f} s · "
                f"{answer.top_k} passages ({answer.retriever}: {sources}) {how} · reused {answer.reused_tokens:,} / "
                f"prefilled {answer.prefilled_tokens:,} prompt tokens[/]\n"
            )
