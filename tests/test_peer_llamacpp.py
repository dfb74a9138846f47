"""The llama.cpp peer: a clear message without llama-cpp-python, and its answer loop (on a stand-in engine)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from cag.measure.peers import llamacpp as peer_llamacpp
from cag.measure.peers.llamacpp import PeerError, llama_cpp_module, run_peer


def test_missing_llama_cpp_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(PeerError, match="pip install llama-cpp-python"):
        llama_cpp_module()
    assert peer_llamacpp.main(["--context-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "pip install llama-cpp-python" in err and "--install" in err


class FakeEngine:
    """Stands in for llama_cpp: the next token is (last token + 1) % vocab; state = tokens so far."""

    VOCAB = 50

    def __init__(self) -> None:
        self.evaluated: list[int] = []
        self.restores = 0
        module = types.ModuleType("llama_cpp")
        module.__version__ = "fake"
        module.llama_token = np.ctypeslib.ctypes.c_int32
        module.Llama = self._llama
        module.llama_state_get_size = lambda ctx: 8 * (len(self.evaluated) + 1)
        module.llama_state_get_data = self._get
        module.llama_state_set_data = self._set
        module.llama_get_logits_ith = self._logits
        module.llama_state_save_file = lambda ctx, path, tokens, n: True
        module.llama_state_load_file = lambda ctx, path, out, cap, count: True
        self.module = module
        self._saved: list[int] = []
        self._buffer = np.zeros(self.VOCAB, dtype=np.float32)

    def _llama(self, **kwargs):
        engine = self

        class Llama:
            n_tokens = 0
            _ctx = types.SimpleNamespace(ctx=object())

            def n_vocab(self):
                return engine.VOCAB

            def eval(self, tokens):
                del engine.evaluated[self.n_tokens :]
                engine.evaluated.extend(tokens)
                self.n_tokens = len(engine.evaluated)

            def save_state(self):
                return list(engine.evaluated)

            def load_state(self, state):
                engine.evaluated[:] = state

            def close(self):
                engine.closed = True

        return Llama()

    def _get(self, ctx, buffer, size):
        self._saved = list(self.evaluated)
        return size

    def _set(self, ctx, buffer, size):
        self.evaluated[:] = self._saved
        self.restores += 1
        return size

    def _logits(self, ctx, index):
        self._buffer[:] = 0
        self._buffer[(self.evaluated[-1] + 1) % self.VOCAB] = 1
        return self._buffer.ctypes.data_as(np.ctypeslib.ctypes.POINTER(np.ctypeslib.ctypes.c_float))


def test_each_question_restores_the_context_and_decodes_greedily(monkeypatch, tmp_path):
    fake = FakeEngine()
    monkeypatch.setitem(sys.modules, "llama_cpp", fake.module)
    context = [1, 2, 3, 4]
    report = run_peer(context, [[10, 11], [40, 45]], gguf=tmp_path / "m.gguf", new_tokens=5, threads=2, eos_token_ids=[48])
    assert fake.restores == 2 and fake.closed
    first, second = report.questions
    assert first.token_ids == [12, 13, 14, 15, 16] and first.new_tokens == 5
    assert second.token_ids == [46, 47]  # 48 is EOS: decoding stops before it
    # The second question saw the context, not the first question's tokens.
    assert fake.evaluated[: len(context) + 2] == context + [40, 45]
    d = report.to_dict()
    assert d["context_tokens"] == 4 and d["threads"] == 2 and len(d["questions"]) == 2
    assert d["summary"]["median_total_s"] == pytest.approx((first.total_s + second.total_s) / 2)
    assert first.total_s > 0 and second.total_s > 0
