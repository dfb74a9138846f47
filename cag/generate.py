"""Generate an answer token by token on top of a KV cache, streaming its text."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from .model import LoadedModel
from .prefill import DEFAULT_CHUNK_SIZE, prefill

__all__ = ["Generation", "generate", "TextStream"]


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" or "length"
    prefill_s: float  # question prefill up to the first token
    total_s: float


class TextStream:
    """Turns a growing list of token ids into text increments, never splitting a character."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        self._tokenizer = tokenizer
        self._on_text = on_text
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> None:
        self._ids.append(token_id)
        if self._on_text is None:
            return
        text = self.text()
        # A trailing replacement character is half of a multi-byte character: wait for the rest.
        if not text.endswith("\ufffd") and len(text) > self._emitted:
            self._on_text(text[self._emitted :])
            self._emitted = len(text)

    def text(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    cache: DynamicCache,
    input_ids: Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = 0,
    on_text: Callable[[str], None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Generation:
    """Feed ``input_ids`` after the cache's tokens, then decode until EOS or ``max_new_tokens``.

    The cache grows by the prompt and answer tokens; the caller crops it back.
    Greedy when ``temperature`` is 0.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed) if (temperature > 0 and seed is not None) else None
    logits = prefill(lm, input_ids, cache, chunk_size=chunk_size).last_logits
    prefill_s = time.perf_counter() - start
    stream = TextStream(lm.tokenizer, on_text)
    finish = "length"
    device_ids = torch.empty((1, 1), dtype=torch.long, device=lm.device)
    for step in range(max_new_tokens):
        token = _pick(logits, temperature, generator)
        if token in lm.eos_token_ids:
            finish = "eos"
            break
        stream.push(token)
        if step + 1 == max_new_tokens:
            break
        device_ids.fill_(token)
        out = lm.model(input_ids=device_ids, past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float()
    return Generation(
        token_ids=list(stream._ids),
        text=stream.text(),
        finish_reason=finish,
        prefill_s=prefill_s,
        total_s=time.perf_counter() - start,
    )
