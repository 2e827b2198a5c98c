"""A local cluster of real node processes on free loopback ports, for the demo, tests and tools.

``LocalCluster`` writes a TOML config into a directory, starts ``run_node.py`` once per node and
can kill (-9), stop, pause (SIGSTOP/SIGCONT) and restart nodes. It always cleans up its processes
when used as a context manager.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from ledger.client import LedgerClient
from ledger.config import ClusterConfig, load_config
from ledger.messages import StatusReply, StatusRequest

RUN_NODE = Path(__file__).resolve().parent.parent / "run_node.py"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_config(directory: Path, nodes: int, genesis: Mapping[str, int], **extra: object) -> Path:
    """A TOML config for ``nodes`` nodes on free loopback ports, data and logs under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ['data_dir = "data"', 'log_dir = "logs"']
    for key, value in extra.items():
        lines.append(f"{key} = {list(value) if isinstance(value, tuple) else value!r}".replace("'", '"'))
    lines.append("[nodes]")
    lines += [f'{i} = "tcp://127.0.0.1:{p}"' for i, p in enumerate(free_ports(nodes))]
    lines.append("[genesis]")
    lines += [f'"{a}" = {b}' for a, b in genesis.items()]
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class LocalCluster:
    def __init__(self, directory: Path, nodes: int = 3, genesis: Mapping[str, int] | None = None,
                 **extra: object) -> None:
        self.dir = Path(directory)
        self.config_path = write_config(self.dir, nodes, genesis or {"alice": 1000, "bob": 500}, **extra)
        self.cfg: ClusterConfig = load_config(self.config_path)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> LocalCluster:
        self.start_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    @property
    def ids(self) -> list[int]:
        return sorted(self.cfg.nodes)

    def start(self, node_id: int) -> None:
        self.procs[node_id] = subprocess.Popen(
            [sys.executable, str(RUN_NODE), str(node_id), "--config", str(self.config_path), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / f"node-{node_id}.stderr", "ab"),
            start_new_session=True,  # a Ctrl-C in the terminal reaches the parent only
        )

    def start_all(self) -> None:
        for i in self.ids:
            self.start(i)

    def alive(self, node_id: int) -> bool:
        p = self.procs.get(node_id)
        return p is not None and p.poll() is None

    def kill(self, node_id: int) -> None:
        """kill -9: no chance to flush or say goodbye."""
        p = self.procs.get(node_id)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()

    def stop(self, node_id: int, timeout: float = 5.0) -> None:
        p = self.procs.get(node_id)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGCONT)
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def pause(self, node_id: int) -> None:
        os.kill(self.procs[node_id].pid, signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        os.kill(self.procs[node_id].pid, signal.SIGCONT)

    def stop_all(self) -> None:
        for i in list(self.procs):
            self.stop(i)

    def client(self, **kw: float) -> LedgerClient:
        return LedgerClient(self.cfg, **kw)

    def wait_leader(self, client: LedgerClient, timeout: float = 10.0, exclude: int | None = None) -> int:
        """Poll until exactly one live node reports itself leader in the highest term."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st: dict[int, StatusReply | None] = {}
            for i in self.ids:
                if i != exclude and self.alive(i):
                    r = client.request(i, StatusRequest(req_id=uuid.uuid4().hex), timeout=0.3)
                    st[i] = r if isinstance(r, StatusReply) else None
            leaders = [s for s in st.values() if s is not None and s.role == "leader"]
            if leaders:
                top = max(leaders, key=lambda s: s.term)
                return top.node_id
            time.sleep(0.02)  # poll interval, not synchronisation: the loop checks a deadline
        raise TimeoutError(f"no leader within {timeout}s")

    def log_file(self, node_id: int) -> Path:
        return self.cfg.log_file(node_id)
