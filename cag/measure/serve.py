"""Time ``cag serve`` as its clients see it, over HTTP, with the server in its own process.

* a long system prompt: time to first token of the first request (nothing cached), of a
  second request with the same system prompt (its prefix restored), and of a third after
  the server restarted (restored from the store), each with the ``cached_tokens`` the
  response reported;
* one knowledge base asked by 1, 4, 8 clients at once against the same requests one at
  a time: wall time and completion tokens per second.

Run it as ``python -m cag.measure.serve`` (``--help`` for options); it prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import BenchError
from .workload import bundled_corpus, bundled_questions

__all__ = ["PromptTiming", "ClientsTiming", "ServeBenchReport", "run_serve_bench"]

_START_TIMEOUT_S = 300  # the first start may convert the embedded model
_REQUEST_TIMEOUT_S = 600
_CHARS_PER_TOKEN = 4  # the bundled corpus in SmolLM2 tokens, roughly; usage reports the real count


@dataclass
class PromptTiming:
    """One streamed request: when its first token came, and what its usage said."""

    when: str  # "cold", "cached", "after restart"
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class ClientsTiming:
    clients: int
    concurrent_s: float  # wall time of the clients' requests sent at once
    one_at_a_time_s: float  # wall time of the same requests sent one after another
    completion_tokens: int

    @property
    def speedup(self) -> float:
        return self.one_at_a_time_s / self.concurrent_s


@dataclass
class ServeBenchReport:
    model: str
    system_prompt_tokens: int
    prompts: list[PromptTiming] = field(default_factory=list)
    clients: list[ClientsTiming] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        for row, timing in zip(out["clients"], self.clients):
            row["speedup"] = round(timing.speedup, 3)
        return out


def run_serve_bench(
    model: str | None = None,
    *,
    home: str | os.PathLike | None = None,
    system_tokens: int = 4096,
    clients: Sequence[int] = (1, 4, 8),
    max_tokens: int = 32,
    threads: int | None = None,
) -> ServeBenchReport:
    """Start ``cag serve`` (twice, for the restart), measure, stop it; ``home`` defaults to a fresh temporary one."""
    if system_tokens < 16 or not clients or min(clients) < 1 or max_tokens < 1:
        raise BenchError("system_tokens must be at least 16, clients positive counts, max_tokens at least 1")
    with tempfile.TemporaryDirectory(prefix="cag-serve-bench-") as scratch:
        home = Path(home) if home is not None else Path(scratch) / "home"
        corpus = bundled_corpus()[0].text
        # A fresh first line, so the first request finds nothing cached even in a home used before.
        system = f"Session {os.urandom(6).hex()}.\n" + corpus[: system_tokens * _CHARS_PER_TOKEN]
        docs = Path(scratch) / "kb.md"
        docs.write_text(corpus[: max(1, system_tokens // 2) * _CHARS_PER_TOKEN], encoding="utf-8")
        options = [*_model_args(model), *(["--threads", str(threads)] if threads else []), "--home", str(home)]
        _cli(["build", str(docs), "--name", "serve-bench", *options])
        questions = bundled_questions()
        report = ServeBenchReport(model=model or "default", system_prompt_tokens=0)
        with _Server(options) as server:
            report.prompts.append(server.chat(None, system, questions[0], max_tokens, "cold"))
            report.prompts.append(server.chat(None, system, questions[1], max_tokens, "cached"))
        with _Server(options) as server:
            report.prompts.append(server.chat(None, system, questions[2], max_tokens, "after restart"))
            server.chat("serve-bench", None, questions[0], 1, "warm-up")  # restore the knowledge base once
            for n in clients:
                asked = [questions[i % len(questions)] for i in range(n)]
                report.clients.append(_clients(server, asked, max_tokens))
        report.system_prompt_tokens = report.prompts[0].prompt_tokens
        return report


def _clients(server: "_Server", questions: list[str], max_tokens: int) -> ClientsTiming:
    start = time.perf_counter()
    alone = [server.chat("serve-bench", None, q, max_tokens, "one at a time") for q in questions]
    one_at_a_time = time.perf_counter() - start
    results: list[PromptTiming | BaseException] = [None] * len(questions)  # type: ignore[list-item]

    def ask(i: int) -> None:
        try:
            results[i] = server.chat("serve-bench", None, questions[i], max_tokens, "concurrent")
        except BaseException as exc:  # re-raised below, in the caller's thread
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = time.perf_counter() - start
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return ClientsTiming(clients=len(questions), concurrent_s=concurrent, one_at_a_time_s=one_at_a_time,
                         completion_tokens=sum(r.completion_tokens for r in alone))


def _model_args(model: str | None) -> list[str]:
    return ["--model", model] if model else []


def _cli(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "cag.cli.main", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"cag {args[0]} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``cag serve`` in a subprocess on a free loopback port, stopped on exit."""

    def __init__(self, options: list[str]) -> None:
        self.port = _free_port()
        self.args = ["serve", "--port", str(self.port), *options]
        self.base = f"http://127.0.0.1:{self.port}"
        self.model_id = ""

    def __enter__(self) -> "_Server":
        self.process = subprocess.Popen([sys.executable, "-m", "cag.cli.main", *self.args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"cag serve exited: {self.process.stderr.read().decode(errors='replace').strip()[-300:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/v1/models", timeout=5) as r:
                    self.model_id = json.loads(r.read())["data"][0]["id"]
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        self.__exit__()
        raise BenchError(f"cag serve did not answer within {_START_TIMEOUT_S} s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def chat(self, model: str | None, system: str | None, question: str, max_tokens: int, when: str) -> PromptTiming:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        body = {"model": model or self.model_id, "messages": messages, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        request = urllib.request.Request(f"{self.base}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        first, usage = None, None
        with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT_S) as response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - start
                usage = chunk.get("usage") or usage
        total = time.perf_counter() - start
        if usage is None:
            raise BenchError("the server's stream ended without usage")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return PromptTiming(when=when, ttft_s=first if first is not None else total, total_s=total,
                            prompt_tokens=usage["prompt_tokens"], cached_tokens=cached,
                            completion_tokens=usage["completion_tokens"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cag.measure.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="as cag serve --model (default: the embedded model)")
    parser.add_argument("--system-tokens", type=int, default=4096, help="length of the long system prompt, roughly")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients to try, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="as cag serve --threads")
    parser.add_argument("--home", default=None, help="cache home (default: a fresh temporary one)")
    args = parser.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
        report = run_serve_bench(args.model, home=args.home, system_tokens=args.system_tokens, clients=clients,
                                 max_tokens=args.max_tokens, threads=args.threads)
    except (BenchError, ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
