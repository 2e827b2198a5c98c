"""Real network partitions: each node a separate host in its own network namespace.

The nodes sit in namespaces joined by veth links to a bridge in a namespace of their own; a client
namespace hangs off the same bridge. Cutting a node's link is a real partition (the TCP
connections stall, nothing is refused). Needs root and ``ip netns``; skipped with a clear message
elsewhere. Nothing is changed in the machine's own network namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_until

from ledger.cluster import RUN_NODE

NODES = 3
PREFIX = f"rl{os.getpid() % 100000}"
SUBNET = "10.213.77"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network-namespace partitions need root"
    if shutil.which("ip") is None:
        return "network-namespace partitions need iproute2's ip"
    probe = f"{PREFIX}probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns is not usable here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Namespaces n0..n2 (nodes) and c (client) on a bridge in namespace br."""

    def __init__(self) -> None:
        self.br = f"{PREFIX}br"
        self.ns = {i: f"{PREFIX}n{i}" for i in range(NODES)}
        self.client_ns = f"{PREFIX}c"
        self.created: list[str] = []

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def setup(self) -> None:
        for name in [self.br, *self.ns.values(), self.client_ns]:
            _ip("netns", "add", name)
            self.created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.br, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.br, "link", "set", "br0", "up")
        hosts = [(f"v{i}", self.ns[i], self.addr(i)) for i in range(NODES)]
        hosts.append(("vc", self.client_ns, f"{SUBNET}.100"))
        for link, ns, addr in hosts:
            # veth pair: "<link>" stays in the bridge namespace, "eth0" goes to the host.
            _ip("-n", self.br, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.br, "link", "set", link, "master", "br0")
            _ip("-n", self.br, "link", "set", link, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def cut(self, i: int) -> None:
        _ip("-n", self.br, "link", "set", f"v{i}", "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.br, "link", "set", f"v{i}", "up")

    def teardown(self) -> None:
        for name in self.created:
            _ip("netns", "del", name, check=False)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"{reason}; the loopback chaos tests still run")
    h = Hosts()
    try:
        h.setup()
        yield h
    finally:
        h.teardown()


def cli(hosts: Hosts, ns: str, cfg: Path, *args: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "ledger.client", "--config", str(cfg),
         "--timeout", str(timeout), *args],
        capture_output=True, text=True, timeout=timeout + 30,
    )


def status(hosts: Hosts, cfg: Path) -> dict:
    r = cli(hosts, hosts.client_ns, cfg, "--json", "status", timeout=3)
    return json.loads(r.stdout)


def wait_leader(hosts: Hosts, cfg: Path, exclude: int | None = None, timeout: float = 15) -> tuple[int, int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = status(hosts, cfg)
        leaders = [n for n in st["nodes"] if n.get("answered") and n["role"] == "leader" and n["id"] != exclude]
        if leaders:
            top = max(leaders, key=lambda n: n["term"])
            return top["id"], top["term"]
        time.sleep(0.1)  # polling interval; the deadline decides
    raise AssertionError("no leader elected")


def test_partitioned_leader_loses_office_and_rejoins(hosts: Hosts, tmp_path: Path) -> None:
    cfg = tmp_path / "cluster.toml"
    nodes = "\n".join(f'{i} = "tcp://{hosts.addr(i)}:5550"' for i in range(NODES))
    cfg.write_text(f'data_dir = "data"\nlog_dir = "logs"\n[nodes]\n{nodes}\n[genesis]\nalice = 1000\nbob = 0\n')
    procs = {}
    try:
        for i in range(NODES):
            procs[i] = subprocess.Popen(
                ["ip", "netns", "exec", hosts.ns[i], sys.executable, str(RUN_NODE), str(i), "--config",
                 str(cfg), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        old, term = wait_leader(hosts, cfg)
        for k in range(5):
            r = cli(hosts, hosts.client_ns, cfg, "submit", "alice", "bob", "10", "--tx-id", f"before-{k}")
            assert r.returncode == 0, r.stdout + r.stderr

        hosts.cut(old)  # the leader is now a minority of one; the majority goes on without it
        new, new_term = wait_leader(hosts, cfg, exclude=old)
        assert new != old and new_term > term
        for k in range(5):
            r = cli(hosts, hosts.client_ns, cfg, "submit", "alice", "bob", "5", "--tx-id", f"during-{k}")
            assert r.returncode == 0, r.stdout + r.stderr
        # A client on the old leader's side of the cut gets no answer, and never a stale one
        # (raft-cases C08): bob has 75 now, the old leader last saw 50.
        stale = cli(hosts, hosts.ns[old], cfg, "balance", "bob", timeout=2)
        assert stale.returncode == 3, stale.stdout + stale.stderr
        assert "50" not in stale.stdout
        # Nor can it commit a transfer on its own.
        lonely = cli(hosts, hosts.ns[old], cfg, "submit", "alice", "bob", "1", "--tx-id", "lonely", timeout=2)
        assert lonely.returncode == 3

        hosts.heal(old)

        def level() -> bool:
            st = status(hosts, cfg)
            heads = {n.get("head_hash") for n in st["nodes"] if n.get("answered")}
            return all(n.get("answered") for n in st["nodes"]) and len(heads) == 1

        wait_until(level, 20, "every node to answer with the same head", 0.2)
        bal = cli(hosts, hosts.client_ns, cfg, "--json", "balance", "bob")
        assert json.loads(bal.stdout)["balance"] == 75
        # The old leader's uncommitted entry was overwritten by the new leader's log.
        assert "lonely" not in _chain_ids(hosts, cfg)
        ver = cli(hosts, hosts.client_ns, cfg, "--json", "verify", timeout=10)
        report = json.loads(ver.stdout)
        assert report["ok"] and report["unreachable"] == [], report
        assert len({n["head_hash"] for n in report["nodes"]}) == 1
    finally:
        for p in procs.values():
            p.kill()
            p.wait(timeout=10)


def _chain_ids(hosts: Hosts, cfg: Path) -> set[str]:
    r = cli(hosts, hosts.client_ns, cfg, "--json", "chain")
    return {tx["tx_id"] for line in r.stdout.splitlines() for tx in json.loads(line)["txs"] if "tx_id" in tx}
