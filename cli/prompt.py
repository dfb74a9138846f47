"""``cag prompt``: automatic prompt caching for any prompt or chat."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import ui
from .options import HomeOpt, StoreOpt


def prompt_command(
    text: Optional[str] = typer.Argument(None, help="The user message (or - for stdin)."),
    system: Optional[Path] = typer.Option(None, "--system", "-s", help="File holding a system prompt (e.g. long instructions or documents)."),
    messages: Optional[Path] = typer.Option(None, "--messages", help="JSON file with a chat: a list of {role, content}."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: 'smollm2' (default), a local folder or a Hugging Face id."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Most tokens in the answer."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy; above 0 samples."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    home: Optional[Path] = HomeOpt,
    store: Optional[str] = StoreOpt,
) -> None:
    """Answer a prompt, reusing the longest cached prefix of it and caching it for next time."""
    import cag

    chat = _read_chat(text, system, messages)
    with ui.one_line_errors():
        with ui.status("Loading model…", quiet=json_out):
            pc = cag.PromptCache(model, home=home, store=store)
        stream = None if json_out else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        out = pc.generate(chat, max_new_tokens=max_new_tokens, temperature=temperature, on_text=stream)
    if json_out:
        ui.print_json({"answer": out.text, "prompt_tokens": out.prompt_tokens, "reused_tokens": out.reused_tokens,
                       "prefilled_tokens": out.prefilled_tokens, "new_tokens": len(out.token_ids),
                       "ttft_s": round(out.ttft_s, 4), "total_s": round(out.total_s, 4), "key": out.key})
    else:
        ui.out.print()
        ui.out.print(f"[dim]reused {out.reused_tokens:,} / prefilled {out.prefilled_tokens:,} prompt tokens · "
                     f"first token {out.ttft_s:.2f} s · total {out.total_s:.2f} s[/]")


def _read_chat(text: Optional[str], system: Optional[Path], messages: Optional[Path]) -> list[dict[str, str]]:
    chat: list[dict[str, str]] = []
    try:
        if messages is not None:
            chat = json.loads(messages.read_text(encoding="utf-8"))
            if not isinstance(chat, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in chat):
                ui.fail(f"{messages} must hold a JSON list of {{\"role\", \"content\"}} objects")
        if system is not None:
            chat.insert(0, {"role": "system", "content": system.read_text(encoding="utf-8")})
    except (OSError, ValueError) as exc:
        ui.fail(f"cannot read the prompt: {exc}")
    if text is not None:
        chat.append({"role": "user", "content": sys.stdin.read() if text == "-" else text})
    if not chat or chat[-1]["role"] != "user" or not chat[-1]["content"].strip():
        ui.fail("no prompt given: pass a message, or --messages FILE ending with a user message")
    return chat
