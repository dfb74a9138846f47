"""The llama.cpp peer for benchmarks: the same model, context and questions, answered by llama.cpp.

cag's default model ships as a GGUF file, so llama.cpp (through ``llama-cpp-python``) can
run the very same weights. The peer prefills the context once, keeps llama.cpp's state
(its KV cache) in memory, and answers each question the way cag does: restore the
state, evaluate the question's tokens, then decode greedily. Both sides get the same
token ids (cag's tokenizer was converted from the GGUF's vocabulary), so the timings
compare like with like.

``llama-cpp-python`` is not a dependency of cag: it compiles llama.cpp on install
(several minutes on 2 cores). Run the peer on its own with::

    python -m cag.measure.peers.llamacpp --context-tokens 4096 --new-tokens 32 --threads 2 [--install]

which prints one JSON object. ``cag bench`` can call :func:`run_peer` with its own
context and question token ids.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Sequence

from ...errors import CagError, PeerError

__all__ = ["LlamaCppPeer", "PeerError", "PeerQuestion", "PeerReport", "llama_cpp_module", "run_peer", "main"]

INSTALL_HINT = (
    "llama-cpp-python is not installed: run `pip install llama-cpp-python` (it compiles llama.cpp, "
    "several minutes), or pass --install"
)


@dataclass
class PeerQuestion:
    """One question answered by llama.cpp: restore its state, evaluate the question, decode."""

    question_tokens: int
    new_tokens: int
    restore_s: float  # llama_state_set_data from memory
    prefill_s: float  # the question's tokens, up to the first new token's logits
    decode_s: float
    total_s: float
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(0, self.new_tokens - 1)  # the first token comes from the prefill's logits
        return steps / self.decode_s if self.decode_s > 0 and steps else 0.0


@dataclass
class PeerReport:
    engine: str
    gguf: str
    threads: int
    context_tokens: int
    context_prefill_s: float
    state_bytes: int
    state_save_s: float
    file_save_s: float  # llama_state_save_file
    file_load_s: float  # llama_state_load_file of that file, page cache warm
    wrapper_load_state_s: float  # Llama.load_state: the Python wrapper's extra copies included
    questions: list[PeerQuestion]

    def summary(self) -> dict[str, float]:
        qs = self.questions
        med = lambda values: statistics.median(values) if values else 0.0  # noqa: E731
        return {
            "median_restore_s": med([q.restore_s for q in qs]),
            "median_question_prefill_s": med([q.prefill_s for q in qs]),
            "median_decode_s": med([q.decode_s for q in qs]),
            "median_total_s": med([q.total_s for q in qs]),
            "median_decode_tokens_per_s": med([q.decode_tokens_per_s for q in qs]),
            "context_prefill_tokens_per_s": self.context_tokens / self.context_prefill_s if self.context_prefill_s else 0.0,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        for q, row in zip(self.questions, d["questions"]):
            row["decode_tokens_per_s"] = q.decode_tokens_per_s
        return d


def llama_cpp_module(install: bool = False) -> ModuleType:
    """Import ``llama_cpp``; with ``install``, pip-install it first when it is missing."""
    try:
        import llama_cpp
    except ImportError:
        if not install:
            raise PeerError(INSTALL_HINT) from None
        done = subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=False)
        if done.returncode != 0:
            raise PeerError(f"`pip install llama-cpp-python` failed (exit {done.returncode}); see pip's output above") from None
        import llama_cpp
    return llama_cpp


class LlamaCppPeer:
    """llama.cpp holding one context: prefill it once, then answer questions after it, each from a restored state."""

    def __init__(
        self,
        context_ids: Sequence[int],
        *,
        gguf: str | os.PathLike | None = None,
        threads: int | None = None,
        max_question_tokens: int = 256,
        new_tokens: int = 32,
        eos_token_ids: Sequence[int] = (),
        install: bool = False,
    ) -> None:
        self._llama_cpp = llama_cpp = llama_cpp_module(install)
        if gguf is None:
            from ...model import embedded_gguf_path

            gguf = embedded_gguf_path()
        self.gguf = str(gguf)
        self.threads = threads or os.cpu_count() or 1
        self.context_ids = list(context_ids)
        self.new_tokens = new_tokens
        self.eos = set(eos_token_ids)
        n_ctx = -(-(len(self.context_ids) + max_question_tokens + new_tokens + 8) // 256) * 256
        try:
            self.llm = llama_cpp.Llama(
                model_path=self.gguf, n_ctx=n_ctx, n_batch=512, n_threads=self.threads, n_threads_batch=self.threads,
                logits_all=False, verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise PeerError(f"llama.cpp cannot load {self.gguf}: {exc}") from exc
        self._ctx = self.llm._ctx.ctx
        self._n_vocab = self.llm.n_vocab()

        start = time.perf_counter()
        self.llm.eval(self.context_ids)
        self.context_prefill_s = time.perf_counter() - start

        start = time.perf_counter()
        size = llama_cpp.llama_state_get_size(self._ctx)
        self._state = (ctypes.c_uint8 * size)()
        self.state_bytes = int(llama_cpp.llama_state_get_data(self._ctx, self._state, size))
        self.state_save_s = time.perf_counter() - start
        if not 0 < self.state_bytes <= size:
            raise PeerError("llama.cpp could not save its state")

    def restore(self) -> None:
        """Put the context's state back (what llama-cpp-python's load_state does, less its extra copies)."""
        if self._llama_cpp.llama_state_set_data(self._ctx, self._state, self.state_bytes) != self.state_bytes:
            raise PeerError("llama.cpp could not load its state")
        self.llm.n_tokens = len(self.context_ids)  # the wrapper's own count of evaluated tokens

    def answer(self, question_ids: Sequence[int]) -> PeerQuestion:
        """Restore the context, evaluate the question, decode greedily up to ``new_tokens`` or EOS."""
        t0 = time.perf_counter()
        self.restore()
        t1 = time.perf_counter()
        self.llm.eval(list(question_ids))
        token = self._argmax()
        t2 = time.perf_counter()
        out: list[int] = []
        while token not in self.eos:
            out.append(token)
            if len(out) == self.new_tokens:
                break
            self.llm.eval([token])
            token = self._argmax()
        t3 = time.perf_counter()
        return PeerQuestion(len(question_ids), len(out), t1 - t0, t2 - t1, t3 - t2, t3 - t0, out)

    def close(self) -> None:
        """Free llama.cpp's model and context now (its finalizer fails at interpreter exit)."""
        self.llm.close()

    def time_state_file(self) -> tuple[float, float]:
        return _time_state_file(self._llama_cpp, self._ctx, self.context_ids)

    def time_wrapper_load_state(self) -> float:
        """llama-cpp-python's own save_state/load_state pair, which copies the state twice more."""
        state = self.llm.save_state()
        start = time.perf_counter()
        self.llm.load_state(state)
        return time.perf_counter() - start

    def _argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self._n_vocab,))
        return int(logits.argmax())


def run_peer(
    context_ids: Sequence[int],
    questions: Sequence[Sequence[int]],
    *,
    gguf: str | os.PathLike | None = None,
    new_tokens: int = 32,
    threads: int | None = None,
    eos_token_ids: Sequence[int] = (),
    install: bool = False,
) -> PeerReport:
    """Answer each question (token ids) after the context with llama.cpp, greedily, timing each step.

    Decoding stops at ``new_tokens`` or at one of ``eos_token_ids``, as cag's generate does.
    """
    peer = LlamaCppPeer(
        context_ids, gguf=gguf, threads=threads, max_question_tokens=max((len(q) for q in questions), default=0),
        new_tokens=new_tokens, eos_token_ids=eos_token_ids, install=install,
    )
    try:
        file_save_s, file_load_s = peer.time_state_file()
        wrapper_load_state_s = peer.time_wrapper_load_state()
        rows = [peer.answer(q) for q in questions]
    finally:
        peer.close()
    return PeerReport(
        engine=f"llama.cpp (llama-cpp-python {getattr(peer._llama_cpp, '__version__', '?')})",
        gguf=peer.gguf,
        threads=peer.threads,
        context_tokens=len(peer.context_ids),
        context_prefill_s=peer.context_prefill_s,
        state_bytes=peer.state_bytes,
        state_save_s=peer.state_save_s,
        file_save_s=file_save_s,
        file_load_s=file_load_s,
        wrapper_load_state_s=wrapper_load_state_s,
        questions=rows,
    )


def _time_state_file(llama_cpp: ModuleType, ctx, context_ids: Sequence[int]) -> tuple[float, float]:
    """llama.cpp's own session file: save it, then load it back (warm), the way cag restores from disk."""
    tokens = (llama_cpp.llama_token * len(context_ids))(*context_ids)
    with tempfile.TemporaryDirectory(prefix="cag-peer-") as folder:
        path = str(Path(folder) / "state.bin").encode()
        start = time.perf_counter()
        if not llama_cpp.llama_state_save_file(ctx, path, tokens, len(context_ids)):
            raise PeerError("llama.cpp could not save its state file")
        saved = time.perf_counter() - start
        out = (llama_cpp.llama_token * len(context_ids))()
        count = ctypes.c_size_t(0)
        start = time.perf_counter()
        if not llama_cpp.llama_state_load_file(ctx, path, out, len(context_ids), ctypes.byref(count)):
            raise PeerError("llama.cpp could not load its state file")
        loaded = time.perf_counter() - start
    return saved, loaded


# -------------------------------------------------------------------- script


def _bench_inputs(context_tokens: int, questions_file: str | None):
    """The context and questions cag bench uses: the bundled corpus cut to ``context_tokens`` tokens."""
    from ...model import load_model
    from ...prompt import PromptBuilder
    from ..workload import bundled_corpus, bundled_questions, context_of_length, read_questions

    lm = load_model(device="cpu")
    builder = PromptBuilder(lm.tokenizer)
    context = context_of_length(builder, bundled_corpus(), context_tokens)
    texts = read_questions(questions_file) if questions_file else bundled_questions()
    return lm, context, texts, [builder.question_ids(q) for q in texts]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cag.measure.peers.llamacpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--context-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--questions", default=None, help="a file with one question per line (default: the bundled ones)")
    parser.add_argument("--gguf", default=None, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--install", action="store_true", help="pip-install llama-cpp-python if missing (compiles, minutes)")
    args = parser.parse_args(argv)
    try:
        llama_cpp_module(args.install)  # fail fast, before loading cag's model
        lm, context, texts, questions = _bench_inputs(args.context_tokens, args.questions)
        report = run_peer(
            context, questions, gguf=args.gguf, new_tokens=args.new_tokens, threads=args.threads,
            eos_token_ids=lm.eos_token_ids,
        )
    except CagError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    out = report.to_dict()
    for row, text in zip(out["questions"], texts):
        row["question"] = text
        row["answer"] = lm.tokenizer.decode(row.pop("token_ids"), skip_special_tokens=True)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
