"""Real redis-server processes on free loopback ports, for the Redis store's tests.

Debian's ``redis-server`` package provides the binaries; ``make test`` installs it
where it is missing. A missing binary fails the tests that need it, with the fix.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT_S = 20


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test` (it installs redis-server) or `apt-get install redis-server`",
                    pytrace=False)
    return path


def free_port(bus: bool = False) -> int:
    """A free loopback port (and, for a cluster node, its bus port +10000 free too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair on loopback")


class RedisServer:
    """One redis-server: ``start``, ``kill`` (SIGKILL, as a crash), ``stop``; ``url`` to reach it."""

    def __init__(self, folder: Path, *args: str, port: int | None = None, password: str | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(bus="--cluster-enabled" in args)
        self.password = password
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        command = [binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                   "--save", "", "--appendonly", "no", "--protected-mode", "no", *self.args]
        if self.password:
            command += ["--requirepass", self.password]
        self.log = open(self.folder / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: see {self.log.name}")
            if self.cli("PING", check=False).stdout.strip() in ("PONG", "NOAUTH Authentication required."):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {START_TIMEOUT_S} s")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        return subprocess.run([binary("redis-cli"), "-p", str(self.port), *auth, *args], capture_output=True,
                              text=True, check=check, timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


class RedisCluster:
    """Three primaries, no replicas, made into a cluster with redis-cli."""

    def __init__(self, folder: Path, nodes: int = 3) -> None:
        self.nodes = [RedisServer(Path(folder) / f"node{i}", "--cluster-enabled", "yes", "--cluster-config-file",
                                  f"nodes-{i}.conf", "--cluster-node-timeout", "5000") for i in range(nodes)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> "RedisCluster":
        for node in self.nodes:
            node.start()
        subprocess.run([binary("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, check=True, timeout=60)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cli("CLUSTER", "INFO").stdout for n in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("the three-node cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
