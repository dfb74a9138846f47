"""The server's model worker in-process: batching by context, joining mid-flight, leaving, the memory bound."""

from __future__ import annotations

import threading

import pytest

import cag
from cag.errors import CacheMemoryError, ModelNotFoundError
from cag.generate import Decoder
from cag.server.contexts import Context, ContextLRU, cache_bytes
from cag.server.worker import Delta, Failed, Finished, GenerationRequest, Job, StopText, Worker, WorkerConfig
from cag.stores import LocalStore

QUESTIONS = ["Who approves travel?", "Where are badges issued?", "What is the refund policy?", "Who is Ida?"]


class Recorder:
    """A job's events, and a way to wait for its end."""

    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    def result(self):
        assert self.done.wait(120), "the job did not finish"
        last = self.events[-1]
        if isinstance(last, Failed):
            raise last.error
        assert "".join(e.text for e in self.events if isinstance(e, Delta)) == last.completion.text
        return last.completion


@pytest.fixture
def kbs(tiny, docs, home):
    other = docs.parent / "other"
    other.mkdir()
    (other / "crates.md").write_text("Crates are labelled in blue on the second floor of the Tarrow warehouse.\n")
    return {"kb": cag.build([docs], name="kb", model=tiny, home=home),
            "kb2": cag.build([other], name="kb2", model=tiny, home=home)}


@pytest.fixture
def steps(monkeypatch):
    """Every step's number of running rows, and hooks run on the worker thread before step n."""
    seen: list[int] = []
    hooks: dict[int, callable] = {}
    step = Decoder.step

    def spy(self):
        if len(seen) in hooks:
            hooks.pop(len(seen))()
        seen.append(len(self.rows))
        return step(self)

    monkeypatch.setattr(Decoder, "step", spy)
    return seen, hooks


def _worker(tiny, home, **config) -> Worker:
    return Worker(tiny, lambda: LocalStore(home / "store"), WorkerConfig(**config))


def _submit(worker: Worker, model: str, question: str, tokens: int = 10) -> tuple[Job, Recorder]:
    recorder = Recorder()
    job = Job(GenerationRequest(model=model, messages=({"role": "user", "content": question},), max_tokens=tokens), recorder)
    worker.submit(job)
    return job, recorder


def _alone(kb, question: str, tokens: int = 10):
    answer = kb.ask(question, max_new_tokens=tokens)
    return answer.text, answer.new_tokens


def _got(completion) -> tuple[str, int]:
    return completion.text.strip(), completion.completion_tokens


def test_requests_on_one_knowledge_base_decode_as_one_batch(tiny, home, kbs, steps):
    seen, _ = steps
    worker = _worker(tiny, home)
    recorders = [_submit(worker, "kb", q)[1] for q in QUESTIONS]  # all waiting before the worker starts
    worker.start()
    try:
        results = [r.result() for r in recorders]
    finally:
        worker.stop()
    assert max(seen) == len(QUESTIONS)
    assert [_got(c) for c in results] == [_alone(kbs["kb"], q) for q in QUESTIONS]
    assert {c.cached_tokens for c in results} == {kbs["kb"].boundary}


def test_a_request_arriving_mid_batch_joins_it_at_a_step(tiny, home, kbs, steps):
    seen, hooks = steps
    worker = _worker(tiny, home)
    later: list[Recorder] = []
    hooks[4] = lambda: later.append(_submit(worker, "kb", QUESTIONS[1], 20)[1])  # while the first decodes
    _, first = _submit(worker, "kb", QUESTIONS[0], 20)
    worker.start()
    try:
        a = first.result()
        assert later, "the hook did not run"
        b = later[0].result()
    finally:
        worker.stop()
    assert seen[:4] == [1, 1, 1, 1] and 2 in seen[4:]
    assert _got(a) == _alone(kbs["kb"], QUESTIONS[0], 20) and _got(b) == _alone(kbs["kb"], QUESTIONS[1], 20)


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(tiny, home, kbs, steps):
    seen, hooks = steps
    worker = _worker(tiny, home)
    gone, left = _submit(worker, "kb", QUESTIONS[0], 200)
    _, stays = _submit(worker, "kb", QUESTIONS[1], 30)
    hooks[3] = lambda: gone.cancelled.set()
    worker.start()
    try:
        kept = stays.result()
        assert not left.done.wait(0.5)  # never finished: dropped
    finally:
        worker.stop()
    assert seen[:3] == [2, 2, 2] and max(seen[4:]) == 1
    assert _got(kept) == _alone(kbs["kb"], QUESTIONS[1], 30)
    assert worker.running == 0


def test_the_cache_ram_bound_holds_with_two_knowledge_bases_under_load(tiny, home, kbs, steps):
    seen, hooks = steps
    sizes = {name: cache_bytes(kb.cache) for name, kb in kbs.items()}
    limit = max(sizes.values()) + min(sizes.values()) // 2  # one at a time, never both
    worker = _worker(tiny, home, cache_ram=limit)
    held: list[int] = []
    for n in range(200):
        hooks[n] = lambda: held.append(worker.contexts.bytes)
    jobs = [(name, q, _submit(worker, name, q)[1]) for q in QUESTIONS[:3] for name in kbs]
    worker.start()
    try:
        results = [(name, q, r.result()) for name, q, r in jobs]
    finally:
        worker.stop()
    assert max(held) <= limit and max(held) >= min(sizes.values())
    for name, question, completion in results:
        assert _got(completion) == _alone(kbs[name], question)


def test_a_knowledge_base_larger_than_cache_ram_is_refused(tiny, home, kbs):
    worker = _worker(tiny, home, cache_ram=1024)
    _, recorder = _submit(worker, "kb", QUESTIONS[0])
    _, unknown = _submit(worker, "no-such-kb", QUESTIONS[0])
    worker.start()
    try:
        with pytest.raises(CacheMemoryError, match="--cache-ram"):
            recorder.result()
        with pytest.raises(ModelNotFoundError):
            unknown.result()
    finally:
        worker.stop()


def test_stop_text_holds_back_what_could_start_a_stop_string():
    stop = StopText(["END", "xy"])
    assert stop.feed("abcE") == ("abc", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("Dmore") == ("", True)  # "END" found: nothing from it on is emitted
    other = StopText(["END"])
    assert other.feed("aE") == ("a", False) and other.feed("x") == ("Ex", False) and other.flush() == ""
    tail = StopText(["END"])
    assert tail.feed("done E") == ("done ", False) and tail.flush() == "E"
    assert StopText([]).feed("anything") == ("anything", False)


def test_context_lru_evicts_the_least_recent_and_never_a_pinned_one(tiny):
    from cag.prefill import prefill

    caches = [prefill(tiny, list(range(5, 5 + n))).cache for n in (10, 10, 10)]
    size = cache_bytes(caches[0])
    lru = ContextLRU(2 * size)
    a, b, c = (Context(k, cache, list(range(5, 15)), "float32") for k, cache in zip("abc", caches))
    assert lru.add(a) and lru.add(b) and lru.bytes == 2 * size
    lru.get("a")  # a is now the most recent
    assert lru.add(c) and lru.get("b") is None and lru.bytes == 2 * size
    lru.pin(a)
    lru.pin(c)
    assert not lru.add(Context("d", caches[1], [1], "float32"))  # both held by running batches: refused, not squeezed in
    assert lru.bytes == 2 * size
    lru.unpin(c)
    assert lru.add(Context("d", caches[1], [1], "float32")) and lru.get("c") is None and lru.get("a") is a
    found = lru.longest_prefix(list(range(5, 12)) + [999], "float32", minimum=4)
    assert found is not None and found[0] is a and found[1] == 7
    assert lru.longest_prefix(list(range(5, 12)), "int8") is None  # an approximate cache is no prompt's prefix
