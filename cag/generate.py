"""Generate answers token by token on top of a KV cache: one streamed, or many in a batch.

There is one decode loop, ``Decoder``: rows continue one context cache, each ``step``
picks one token per row, rows join between steps and leave when they finish (or are
dropped). ``generate`` and ``generate_batch`` run it, and so do ``KnowledgeBase.ask``
and ``ask_many``, ``PromptCache``, the CLI and the server's model worker.

Where the model allows it (see ``cag.batch``), the cache is read, never written: the
prompt and answer tokens go into a small buffer of their own, so a step costs no copy
of the context and any number of prompts share one context cache. Other models take
the plain route, appending to the ``DynamicCache`` as transformers does, one row at a
time (rows added meanwhile wait their turn).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from .batch import SharedPrefixBatch, UnsupportedAttention, prefix_tensors, supports_shared_prefix
from .kvcache import cache_from_layers, crop_to
from .model import LoadedModel, forward
from .prefill import DEFAULT_CHUNK_SIZE, prefill

__all__ = ["Decoder", "Generation", "Row", "Sampling", "TextStream", "generate", "generate_batch"]


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

    def __len__(self) -> int:
        return len(self._ids)

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


@dataclass(frozen=True)
class Sampling:
    """How each next token is picked: greedy at ``temperature`` 0; otherwise sampled after
    transformers' own warpers (temperature, then nucleus ``top_p``), from a generator of the
    row's own seeded with ``seed`` (None: torch's global generator)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class _Sampler:
    def __init__(self, sampling: Sampling) -> None:
        self.greedy = sampling.greedy
        self._generator = None
        self._warpers = LogitsProcessorList()
        if not self.greedy:
            if sampling.seed is not None:
                self._generator = torch.Generator().manual_seed(sampling.seed)
            self._warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_p < 1.0:
                self._warpers.append(TopPLogitsWarper(sampling.top_p))

    def pick(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(logits))
        scores = self._warpers(None, logits[None])  # these warpers read the scores only
        probs = torch.softmax(scores[0], dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=self._generator))


@dataclass(eq=False)
class Row:
    """One sequence in a ``Decoder``: its prompt, its answer so far, and why it ended."""

    prompt: list[int]
    limit: int
    stream: TextStream
    sampler: _Sampler
    started: float
    prefill_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str | None = None  # "eos", "length", or what the caller passed to ``drop``

    @property
    def token_ids(self) -> list[int]:
        return self.stream.token_ids

    def generation(self) -> Generation:
        return Generation(self.stream.token_ids, self.stream.text(), self.finish_reason or "length", self.prefill_s,
                          self.total_s)


class Decoder:
    """The decode loop: rows continuing ``cache``, one token each per ``step``.

    ``add`` prefills new rows (between steps: a row joins a running batch at a step
    boundary), ``step`` picks one token per row and returns the rows that finished,
    ``drop`` takes a row out early (e.g. its client left). Greedy rows get the answer
    they would get alone, token for token (barring an exact near-tie that float rounding
    tips either way); sampled rows draw from generators of their own.

    ``extend`` (one row only) leaves the prompt and answer tokens (all but the last) in
    ``cache``; otherwise ``cache`` is left exactly as it was. ``before_first_token`` is
    called once, after the first prompt's prefill and before its first token is counted
    or picked: where a restored cache's background check (``PendingCheck.wait``) is awaited.
    """

    def __init__(self, lm: LoadedModel, cache: DynamicCache, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 extend: bool = False, shared: bool | None = None,
                 before_first_token: Callable[[], object] | None = None) -> None:
        self.lm = lm
        self._before_first_token = before_first_token
        self.cache = cache
        self.chunk_size = chunk_size
        self.extend = extend
        self.rows: list[Row] = []  # running, in batch order
        self._shared = supports_shared_prefix(lm, cache) if shared is None else shared
        self._batch: SharedPrefixBatch | None = None
        self._waiting: list[Row] = []  # the appending path runs one row at a time; the others wait here
        self._boundary = cache.get_seq_length()
        self._logits: torch.Tensor | None = None  # [rows, vocab] for the next pick
        self._picked: list[int] | None = None  # tokens picked last step, fed at the next one

    @property
    def shared(self) -> bool:
        """Whether rows decode together on the shared-prefix path (else one after another)."""
        return self._shared

    def __len__(self) -> int:
        return len(self.rows) + len(self._waiting)

    def add(self, prompts: Sequence[Sequence[int]], limits: Sequence[int],
            sampling: Sampling | Sequence[Sampling] = Sampling(),
            on_text: Sequence[Callable[[str], None] | None] | None = None) -> list[Row]:
        """Add rows, each with its prompt, most new tokens, sampling and text callback; prefilled now if they can run."""
        started = time.perf_counter()
        callbacks = list(on_text) if on_text is not None else [None] * len(prompts)
        samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        rows = [Row([int(t) for t in p], n, TextStream(self.lm.tokenizer, cb), _Sampler(how), started)
                for p, n, how, cb in zip(prompts, limits, samplings, callbacks, strict=True)]
        if any(not row.prompt for row in rows):
            raise ValueError("every row needs at least one prompt token")
        if self.extend and len(self) + len(rows) > 1:
            raise ValueError("a decoder that extends its cache runs one row")
        if rows and self._shared:
            self._feed()
            try:
                self._join(rows)
                return rows
            except UnsupportedAttention:
                if self.rows:
                    raise
                self._shared = False  # raised in the first layer, before any token: nothing to undo
        self._waiting += rows
        self._start_next()
        return rows

    def step(self) -> list[Row]:
        """Pick one token for every running row; returns the rows that finished (no longer in ``rows``)."""
        self._feed()
        if not self.rows:
            return []
        tokens = self._pick()
        finished, keep = [], []
        for index, (row, token) in enumerate(zip(self.rows, tokens)):
            reason = _push(row.stream, token, row.limit, self.lm.eos_token_ids)
            if reason is None:
                keep.append(index)
            else:
                self._finish(row, reason, index)
                finished.append(row)
        self._keep(keep)
        self._picked = [tokens[i] for i in keep]
        if not self.rows:
            self._start_next()
        return finished

    def run(self) -> None:
        """Step until every row, waiting ones included, has finished."""
        while len(self):
            self.step()

    def drop(self, row: Row, reason: str = "stop") -> None:
        """End ``row`` now, with ``reason``; its place in the batch is freed."""
        if row in self._waiting:
            self._waiting.remove(row)
            row.finish_reason = row.finish_reason or reason
            return
        if row.finish_reason is not None or row not in self.rows:
            return
        index = self.rows.index(row)
        self._finish(row, reason, index)
        keep = [i for i in range(len(self.rows)) if i != index]
        if self._picked is not None:
            self._picked = [self._picked[i] for i in keep]
        self._keep(keep)
        if not self.rows:
            self._start_next()

    def prompt_cache(self, row: Row, tokens: int) -> DynamicCache:
        """A new cache (a copy) of the context and the first ``tokens`` of a running ``row``'s prompt.

        What a prompt cache stores: the row's own keys and values come from the batch's
        buffer (the appending path: from the cache it appends to), so nothing is recomputed.
        """
        index = self.rows.index(row)
        layers = []
        for i in range(self.lm.num_layers):
            if self._shared:
                keys, values = (t[:, :, :tokens] for t in self._batch.suffix(i, index))
                prefix_keys, prefix_values = prefix_tensors(self.cache, i)
                if prefix_keys is not None:
                    keys = torch.cat([prefix_keys.to(keys.dtype), keys], dim=-2)
                    values = torch.cat([prefix_values.to(values.dtype), values], dim=-2)
            else:
                end = self._boundary + tokens
                keys, values = self.cache.layers[i].keys[:, :, :end], self.cache.layers[i].values[:, :, :end]
            layers.append((keys.clone(), values.clone()))
        return cache_from_layers(layers)

    def close(self) -> None:
        """Leave ``cache`` as promised even if decoding stopped half-way (an exception, a dropped client)."""
        if not self._shared and not self.extend:
            crop_to(self.cache, self._boundary)

    # ------------------------------------------------------------------ internals

    def _join(self, rows: list[Row]) -> None:
        if self._batch is None:
            self._batch = SharedPrefixBatch(self.lm, self.cache, 0, capacity=0)
        reserve = max(max(0, r.limit) for r in rows)
        logits = self._batch.add_rows([r.prompt for r in rows], self.chunk_size, reserve=reserve)
        self._prefilled(rows, logits)

    def _start_next(self) -> None:
        """The appending path: prefill the next waiting row once the cache is free."""
        if self._shared or self.rows or not self._waiting:
            return
        row = self._waiting.pop(0)
        logits = prefill(self.lm, row.prompt, self.cache, chunk_size=self.chunk_size).last_logits
        self._prefilled([row], logits[None])

    def _prefilled(self, rows: list[Row], logits: torch.Tensor) -> None:
        if self._before_first_token is not None:
            wait, self._before_first_token = self._before_first_token, None
            wait()
        done = time.perf_counter()
        for row in rows:
            row.prefill_s = done - row.started
        self.rows += rows
        self._logits = logits if self._logits is None or not len(self._logits) else torch.cat([self._logits, logits])

    def _feed(self) -> None:
        """Run the tokens picked last step through the model, so every running row has logits to pick from."""
        if not self._picked:
            self._picked = None
            return
        tokens, self._picked = self._picked, None
        if self._shared:
            self._logits = self._batch.step(torch.tensor(tokens, dtype=torch.long, device=self.lm.device))
            return
        lm, cache = self.lm, self.cache
        with torch.inference_mode():
            device_ids = torch.tensor([[tokens[0]]], dtype=torch.long, device=lm.device)
            out = forward(lm.model, cache, input_ids=device_ids)
        self._logits = out.logits[:, -1].float()

    def _pick(self) -> list[int]:
        """One token per row: greedy rows in one argmax, sampled rows each from its own generator."""
        tokens = torch.argmax(self._logits, dim=-1).tolist()
        for i, row in enumerate(self.rows):
            if not row.sampler.greedy:
                tokens[i] = row.sampler.pick(self._logits[i])
        return tokens

    def _finish(self, row: Row, reason: str, index: int) -> None:
        row.stream.flush()
        row.finish_reason = reason
        row.total_s = time.perf_counter() - row.started
        if self.extend and self._shared:
            for i in range(self.lm.num_layers):
                self.cache.update(*self._batch.suffix(i, index), i)
        elif not self._shared and not self.extend:
            crop_to(self.cache, self._boundary)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self._logits.device)
        self._logits = self._logits.index_select(0, index)
        if self._shared:
            self._batch.keep_rows(keep)


def _push(stream: TextStream, token: int, limit: int, eos: Sequence[int]) -> str | None:
    """Take one picked token; returns why the answer ends here, or None if it goes on."""
    if limit <= 0:
        return "length"
    if token in eos:
        return "eos"
    stream.push(token)
    return "length" if len(stream) >= limit else None


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
    top_p: float = 1.0,
    before_first_token: Callable[[], object] | None = None,
) -> Generation:
    """Feed ``input_ids`` after the cache's tokens, then decode until EOS or ``max_new_tokens``.

    Greedy when ``temperature`` is 0; ``on_text`` receives the answer's text as it grows.
    With ``extend_cache`` the cache grows by the prompt and answer tokens (all but the
    last) and the caller crops it back; with ``extend_cache=False`` it is left exactly as
    it was, which is what answering many questions against one context wants.
    ``before_first_token``: see ``Decoder``.
    """
    if not input_ids:
        raise ValueError("generate needs at least one prompt token")
    decoder = Decoder(lm, cache, chunk_size=chunk_size, extend=extend_cache, before_first_token=before_first_token)
    try:
        [row] = decoder.add([input_ids], [max_new_tokens], Sampling(temperature, top_p, seed), [on_text])
        decoder.run()
    finally:
        decoder.close()
    return row.generation()


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
    top_p: float = 1.0,
    before_first_token: Callable[[], object] | None = None,
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
    decoder = Decoder(lm, cache, chunk_size=chunk_size, before_first_token=before_first_token)
    try:
        rows = decoder.add(prompts, limits, Sampling(temperature, top_p, seed))
        decoder.run()
    finally:
        decoder.close()
    return [row.generation() for row in rows]


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
    """The plain route, forced: the prompt and answer are appended to ``cache`` (and cropped off unless ``extend``)."""
    decoder = Decoder(lm, cache, chunk_size=chunk_size, extend=extend, shared=False)
    try:
        [row] = decoder.add([input_ids], [max_new_tokens], Sampling(temperature, 1.0, seed), [on_text])
        decoder.run()
    finally:
        decoder.close()
    return row.generation()
