"""Several processes building and reading the same keys at once: no error, one valid entry each."""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback

import pytest
import torch

from cag.hashing import chain_seed, sequence_key
from cag.kvcache import CacheMetadata, cache_from_layers
from cag.stores import LocalStore

pytestmark = pytest.mark.services

PROCESSES = 4
SPAWN = multiprocessing.get_context("spawn")
FP = "f" * 64


def _run(target, args_per_process: list[tuple], timeout: float = 240) -> list:
    """Start the processes together (a barrier), collect one result each, re-raise a child's failure."""
    results = SPAWN.Queue()
    barrier = SPAWN.Barrier(len(args_per_process))
    procs = [SPAWN.Process(target=_child, args=(target, barrier, results, args)) for args in args_per_process]
    for p in procs:
        p.start()
    found = []
    deadline = time.monotonic() + timeout
    try:
        for _ in procs:
            ok, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            assert ok, f"a child process failed:\n{value}"
            found.append(value)
    except queue.Empty:
        pytest.fail("child processes did not finish in time")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return found


def _child(target, barrier, results, args) -> None:
    try:
        results.put((True, target(barrier, *args)))
    except BaseException:
        results.put((False, traceback.format_exc()))


# ---------------------------------------------------------------- whole builds


def _build_and_read(barrier, home: str, docs: str, order: list[str]) -> dict:
    import cag
    from conftest import make_tiny_model

    lm = make_tiny_model(seed=0)  # same seed, same weights: the same fingerprint in every process
    sets = {"two": [f"{docs}/refunds.md", f"{docs}/travel.md"],
            "three": [f"{docs}/refunds.md", f"{docs}/travel.md", f"{docs}/badges.txt"]}
    barrier.wait()
    keys = {}
    for name in order:
        kb = cag.build(sets[name], name=name, model=lm, home=home)
        keys[name] = kb.key
    answers = {}
    for name in order:
        kb = cag.load(name, model=lm, home=home)
        assert kb.cache.get_seq_length() == kb.boundary
        answers[name] = kb.ask("Who approves travel?", max_new_tokens=3).token_ids
    return {"fingerprint": lm.fingerprint, "keys": keys, "answers": answers}


def _both(barrier, home: str, docs: str, order: list[str], root: str, worker: int) -> dict:
    """Each process does both jobs, so the suite pays for starting the processes once."""
    return {"build": _build_and_read(barrier, home, docs, order), "hammer": _hammer(barrier, root, worker)}


@pytest.fixture(scope="module")
def hammered(tmp_path_factory):
    """Four processes: whole builds of the same documents into one home, then puts/reads of one raw store."""
    base = tmp_path_factory.mktemp("concurrency")
    docs = base / "docs"
    docs.mkdir()
    (docs / "refunds.md").write_text("# Refunds\nReturns are accepted within 21 days with form RF-20.\n")
    (docs / "travel.md").write_text("# Travel\nTravel above 500 crowns is approved by Ida Marsh, the finance lead.\n")
    (docs / "badges.txt").write_text("Badges are issued at the Lisbon front desk between 9 and 11.\n")
    home, root = base / "home", base / "raw-store"
    orders = [["two", "three"], ["three", "two"]] * (PROCESSES // 2)
    found = _run(_both, [(str(home), str(docs), order, str(root), w) for w, order in enumerate(orders)])
    return home, root, found


def test_processes_build_and_read_the_same_caches(tiny, hammered):
    home, _, results = hammered
    found = [r["build"] for r in results]

    assert {r["fingerprint"] for r in found} == {tiny.fingerprint}
    assert len({tuple(sorted(r["keys"].items())) for r in found}) == 1  # every process built the same keys
    assert len({tuple(sorted((k, tuple(v)) for k, v in r["answers"].items())) for r in found}) == 1

    store = LocalStore(home / "store")
    entries = store.entries()
    assert sorted(e.key for e in entries) == sorted(found[0]["keys"].values())
    assert sorted(n for e in entries for n in e.names) == ["three", "two"]
    assert sum(e.hits for e in entries) >= PROCESSES * 2  # every load restored from the store
    files = sorted(p.name for p in (home / "store" / "entries").iterdir())
    assert files == sorted(f"{e.key}.safetensors" for e in entries)  # no stray or temporary files
    report = store.verify()
    assert sorted(report.ok) == sorted(e.key for e in entries) and not report.quarantined and not report.removed_rows
    for e in entries:
        assert store.restore(e).cache.get_seq_length() == e.tokens
    store.close()


# ------------------------------------------------------------------ raw store


def _fake(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return cache_from_layers([(torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)) for _ in range(2)])


def _meta(n: int) -> CacheMetadata:
    return CacheMetadata(model_name="fake", fingerprint=FP, tokenizer_hash="t", kv_dtype="float32",
                         tokens=n, num_layers=2)


SEQUENCES = [[s] * 3 + list(range(100 + s, 100 + s + 40 + 20 * s)) for s in range(5)]


def _hammer(barrier, root: str, worker: int) -> list[str]:
    store = LocalStore(root, block_size=4)
    barrier.wait()
    keys = []
    for rnd in range(3):
        for i in range((worker + rnd) % 5, (worker + rnd) % 5 + 5):
            ids = SEQUENCES[i % 5]
            entry = store.put(_fake(len(ids), i % 5), ids, _meta(len(ids)), name=f"seq{i % 5}")
            keys.append(entry.key)
            match = store.longest_prefix(ids + [1, 2], FP, "float32")
            assert match is not None and match.entry.key == entry.key and match.tokens == len(ids)
            restored = store.restore(match.entry, len(ids) // 2)
            assert restored.token_ids == ids[: len(ids) // 2]
            assert torch.equal(restored.cache.layers[0].keys, _fake(len(ids), i % 5).layers[0].keys[:, :, : len(ids) // 2])
        if worker == 0:
            assert not store.verify().quarantined  # verify runs while the others write
    store.close()
    return sorted(set(keys))


def test_processes_hammering_one_store_leave_one_valid_entry_per_key(hammered):
    _, root, results = hammered
    found = [r["hammer"] for r in results]
    seed = chain_seed(FP, "float32", 4)
    expected = sorted(sequence_key(ids, seed, 4) for ids in SEQUENCES)
    assert all(keys == expected for keys in found)

    store = LocalStore(root)
    assert store.block_size == 4
    entries = store.entries()
    assert sorted(e.key for e in entries) == expected
    assert sorted(e.names for e in entries) == [(f"seq{i}",) for i in range(5)]
    assert sorted(p.name for p in (root / "entries").iterdir()) == sorted(f"{k}.safetensors" for k in expected)
    report = store.verify()
    assert sorted(report.ok) == expected and not report.quarantined and not report.removed_rows
    assert not (root / "quarantine").exists()
    store.close()


# ------------------------------------------------------- verify during a build


def _slow_build(ready, root: str) -> str:
    import cag.stores.local as local

    def slowed(real):
        def slow(*args):
            time.sleep(1.0)  # stretch the steps around publishing the file
            return real(*args)
        return slow

    for step in ("_file_sha256", "_fsync_dir"):
        if hasattr(local, step):
            setattr(local, step, slowed(getattr(local, step)))
    store = LocalStore(root, block_size=4)
    ready.set()
    ids = SEQUENCES[0]
    return store.put(_fake(len(ids), 0), ids, _meta(len(ids)), name="slow").key


def test_verify_while_a_build_publishes_its_file_keeps_it(tmp_path):
    """verify must not take a file for a stray one while its build is between rename and commit."""
    root = tmp_path / "store"
    store = LocalStore(root, block_size=4)
    final = root / "entries" / f"{sequence_key(SEQUENCES[0], chain_seed(FP, 'float32', 4), 4)}.safetensors"
    results = SPAWN.Queue()
    ready = SPAWN.Event()
    proc = SPAWN.Process(target=_child, args=(_slow_build, ready, results, (str(root),)))
    proc.start()
    try:
        deadline = time.monotonic() + 240
        while not final.exists():
            assert time.monotonic() < deadline and proc.is_alive(), "the build never published its file"
            time.sleep(0.002)
        report = store.verify()
        ok, key = results.get(timeout=120)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert ok, key
    assert report.quarantined == []  # the new file was not taken for a stray one
    entry = store.resolve("slow")
    assert entry.key == key and final.exists()
    assert store.restore(entry).cache.get_seq_length() == len(SEQUENCES[0])
    assert not store.verify().quarantined
    store.close()
