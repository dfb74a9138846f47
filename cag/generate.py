"""Generate answers token by token on top of a KV cache: one streamed, or many in a batch.

Where the model allows it (see ``cag.batch``), the cache is read, never written: the
prompt and answer tokens go into a small buffer of their own, so a step costs no copy
of the context and any number of prompts share one context cache. Other models take
the plain route, appending to the ``DynamicCache`` as transformers does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from .batch import SharedPrefixBatch, UnsupportedAttention, supports_shared_prefix
from .kvcache import crop_to
from .model import LoadedModel, forward
from .prefill import DEFAULT_CHUNK_SIZE, prefill

__all__ = ["Generation", "generate", "generate_batch", "TextStream"]


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" or "length"
    prefill_s: float  # prompt prefill up to the first token (the whole batch's, in a batch)
    total_s: float  # until this answer's last token


class TextStream:
    """Turns a growing list of token ids into text increments, never splitting a character."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        self._tokenizer = tokenizer
        self._on_text = on_text
        self._ids: list[int] = []
        self._emitted = 0

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def push(self, token_id: int) -> None:
        self._ids.append(token_id)
        self._emit(final=False)

    def text(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def flush(self) -> None:
        """At the end: emit what is left, even a character whose other half never came."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self._on_text is None:
            return
        text = self.text()
        # A trailing replacement character is half of a multi-byte character: wait for the rest.
        if (final or not text.endswith("\ufffd")) and len(text) > self._emitted:
            self._on_text(text[self._emitted :])
            self._emitted = len(text)


def _generator(temperature: float, seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if (temperature > 0 and seed is not None) else None


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _pick_rows(logits: torch.Tensor, temperature: float, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row; sampling draws each row from its own generator, as a lone prompt would."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1).tolist()
    return [_pick(row, temperature, g) for row, g in zip(logits, generators)]


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
    extend_cache: bool = True,
) -> Generation:
    """Feed ``input_ids`` after the cache's tokens, then decode until EOS or ``max_new_tokens``.

    Greedy when ``temperature`` is 0; ``on_text`` receives the answer's text as it grows.
    With ``extend_cache`` the cache grows by the prompt and answer tokens (all but the
    last) and the caller crops it back; with ``extend_cache=False`` it is left exactly as
    it was, which is what answering many questions against one context wants.
    """
    input_ids = [int(t) for t in input_ids]
    if not input_ids:
        raise ValueError("generate needs at least one prompt token")
    if supports_shared_prefix(lm, cache):
        try:
            return _generate_shared(lm, cache, [input_ids], [max_new_tokens], temperature, seed, on_text, chunk_size,
                                    extend_cache)[0]
        except UnsupportedAttention:
            pass  # raised in the first layer, before any token: nothing to undo
    return _generate_appending(lm, cache, input_ids, max_new_tokens, temperature, seed, on_text, chunk_size, extend_cache)


@torch.inference_mode()
def generate_batch(
    lm: LoadedModel,
    cache: DynamicCache,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 256,
    temperature: float = 0.0,
    seed: int | None = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[Generation]:
    """Continue ``cache`` with each prompt, all in one batch; ``cache`` is left as it was.

    The context cache is shared by every row, not copied. Each result is the one
    ``generate`` gives for that prompt alone: greedy answers token for token (barring an
    exact near-tie that float rounding tips either way), and sampling draws each row from
    its own generator seeded with ``seed``. ``max_new_tokens`` may differ per prompt.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("generate_batch needs at least one token per prompt")
    limits = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} limits for {len(prompts)} prompts")
    if not prompts:
        return []
    if supports_shared_prefix(lm, cache):
        try:
            return _generate_shared(lm, cache, prompts, limits, temperature, seed, None, chunk_size, False)
        except UnsupportedAttention:
            pass
    return [
        _generate_appending(lm, cache, p, n, temperature, seed, None, chunk_size, False) for p, n in zip(prompts, limits)
    ]


def _generate_shared(
    lm: LoadedModel,
    cache: DynamicCache,
    prompts: list[Sequence[int]],
    limits: list[int],
    temperature: float,
    seed: int | None,
    on_text: Callable[[str], None] | None,
    chunk_size: int,
    extend: bool,
) -> list[Generation]:
    start = time.perf_counter()
    count = len(prompts)
    batch = SharedPrefixBatch(lm, cache, count, capacity=max(len(p) for p in prompts) + max(0, max(limits)))
    streams = [TextStream(lm.tokenizer, on_text if count == 1 else None) for _ in prompts]
    generators = [_generator(temperature, seed) for _ in prompts]
    results: list[Generation | None] = [None] * count
    logits = batch.prefill(prompts, chunk_size)
    prefill_s = time.perf_counter() - start
    active = list(range(count))  # prompt index of each row still running
    while active:
        tokens = _pick_rows(logits, temperature, [generators[i] for i in active])
        keep = []
        for row, (index, token) in enumerate(zip(active, tokens)):
            finish = _push(streams[index], token, limits[index], lm.eos_token_ids)
            if finish is None:
                keep.append(row)
            else:
                streams[index].flush()
                results[index] = Generation(streams[index].token_ids, streams[index].text(), finish, prefill_s,
                                            time.perf_counter() - start)
        if not keep:
            break
        if len(keep) < len(active):
            batch.keep_rows(keep)
            active, tokens = [active[r] for r in keep], [tokens[r] for r in keep]
        logits = batch.step(torch.tensor(tokens, dtype=torch.long, device=lm.device))
    if extend:
        for i in range(lm.num_layers):
            cache.update(*batch.suffix(i), i)
    return results  # type: ignore[return-value]


def _push(stream: TextStream, token: int, limit: int, eos: Sequence[int]) -> str | None:
    """Take one picked token; returns why the answer ends here, or None if it goes on."""
    if limit <= 0:
        return "length"
    if token in eos:
        return "eos"
    stream.push(token)
    return "length" if len(stream._ids) >= limit else None


@torch.inference_mode()
def _generate_appending(
    lm: LoadedModel,
    cache: DynamicCache,
    input_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    seed: int | None,
    on_text: Callable[[str], None] | None,
    chunk_size: int,
    extend: bool,
) -> Generation:
    """The plain route: the prompt and answer are appended to ``cache`` (and cropped off unless ``extend``)."""
    start = time.perf_counter()
    boundary = cache.get_seq_length()
    generator = _generator(temperature, seed)
    try:
        logits = prefill(lm, input_ids, cache, chunk_size=chunk_size).last_logits
        prefill_s = time.perf_counter() - start
        stream = TextStream(lm.tokenizer, on_text)
        device_ids = torch.empty((1, 1), dtype=torch.long, device=lm.device)
        while True:
            finish = _push(stream, _pick(logits, temperature, generator), max_new_tokens, lm.eos_token_ids)
            if finish is not None:
                stream.flush()
                break
            device_ids.fill_(stream._ids[-1])
            out = forward(lm.model, cache, input_ids=device_ids)
            logits = out.logits[0, -1].float()
    finally:
        if not extend:
            crop_to(cache, boundary)
    return Generation(stream.token_ids, stream.text(), finish, prefill_s, time.perf_counter() - start)
