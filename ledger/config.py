"""Cluster configuration: the default in ``server_config.py`` or a TOML file, validated by pydantic."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ledger.messages import NAME_PATTERN, one_line
from ledger.state import MAX_AMOUNT

_ENDPOINT = re.compile(r"^tcp://(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


class ConfigError(Exception):
    """A configuration that cannot be used; the text is a one-line reason."""


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Path("data")
    log_dir: Path = Path("logs")
    nodes: dict[Annotated[int, Field(ge=0, le=1023)], str]
    genesis: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Annotated[int, Field(ge=0, le=MAX_AMOUNT, strict=True)]]
    # Timing, in milliseconds. Failover takes about one election timeout.
    tick_ms: Annotated[int, Field(ge=1, le=1000, strict=True)] = 10
    heartbeat_ms: Annotated[int, Field(ge=1, le=60_000, strict=True)] = 50
    election_timeout_ms: tuple[Annotated[int, Field(ge=1, le=600_000, strict=True)],
                               Annotated[int, Field(ge=1, le=600_000, strict=True)]] = (300, 600)
    # Under load (node.LINGER_MIN_BATCH) a leader proposes at most one batch of transfers (one
    # log entry, one block) per interval, unless a full batch is waiting; a transfer waits for
    # the next batch at most this long. Each entry costs every node about the same whatever it
    # holds: 0 proposes at every turn of the loop, small entries that can take most of the CPU.
    batch_interval_ms: Annotated[int, Field(ge=0, le=100, strict=True)] = 5
    # "debug" adds a line per commit on every node, which costs a loaded node several percent.
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("nodes")
    @classmethod
    def _check_nodes(cls, nodes: dict[int, str]) -> dict[int, str]:
        if not nodes:
            raise ValueError("at least one node is required")
        seen: set[str] = set()
        for node_id, endpoint in nodes.items():
            m = _ENDPOINT.fullmatch(endpoint)  # not match: its $ also accepts a trailing newline
            if not m or not 1 <= int(m["port"]) <= 65535:
                raise ValueError(f"node {node_id}: endpoint {endpoint!r} is not tcp://HOST:PORT")
            host = m["host"].strip("[]")
            if re.fullmatch(r"[0-9.]+|.*:.*", host):  # an address, not a name: it must be one
                try:
                    ipaddress.ip_address(host)
                except ValueError:
                    raise ValueError(f"node {node_id}: {host} in {endpoint} is not an IP address") from None
            if endpoint in seen:
                raise ValueError(f"node {node_id}: endpoint {endpoint} is used twice")
            seen.add(endpoint)
        return nodes

    @field_validator("genesis")
    @classmethod
    def _check_genesis(cls, genesis: dict[str, int]) -> dict[str, int]:
        # In TOML a key written below the [genesis] header belongs to it: an optional key put at
        # the end of the file would silently become an account and the setting stay the default.
        for name in genesis:
            if name in cls.model_fields:
                raise ValueError(f"account {name!r} has the name of a top-level setting; settings go at the "
                                 f"top of the file, before [nodes] and [genesis]")
        return genesis

    @model_validator(mode="after")
    def _check_timing(self) -> "ClusterConfig":
        lo, hi = self.election_timeout_ms
        if lo > hi:
            raise ValueError("election_timeout_ms: the lower bound is above the upper bound")
        if self.heartbeat_ms * 3 > lo:
            raise ValueError("heartbeat_ms must be at most a third of the election timeout")
        if self.tick_ms > self.heartbeat_ms:
            raise ValueError("tick_ms must not exceed heartbeat_ms")
        return self

    def node_dir(self, node_id: int) -> Path:
        return self.data_dir / f"node-{node_id}"

    def log_file(self, node_id: int) -> Path:
        return self.log_dir / f"node-{node_id}.log"

    def require_node(self, node_id: int) -> str:
        if node_id not in self.nodes:
            ids = ", ".join(str(i) for i in sorted(self.nodes))
            raise ConfigError(f"node id {node_id} is not in the config (ids: {ids})")
        return self.nodes[node_id]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def parse_config(raw: dict, source: str) -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(one_line(f"{source}: {_first_error(exc)}")) from None  # keys may hold line breaks


def load_config(path: str | Path | None = None) -> ClusterConfig:
    """The config in TOML file ``path``; without one, the default in ``server_config.py``.

    Relative data_dir/log_dir in a file are taken relative to the file's directory.
    """
    if path is None:
        import server_config

        return parse_config(server_config.CONFIG, "server_config.py")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # not an OSError: without this it escaped as a traceback
        raise ConfigError(f"cannot read config {p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    if isinstance(raw.get("nodes"), dict):
        try:
            nodes = {int(k): v for k, v in raw["nodes"].items()}
        except ValueError:
            raise ConfigError(f"{p}: nodes: node ids must be integers") from None
        if len(nodes) != len(raw["nodes"]):  # e.g. "1" and "01": one node would silently vanish
            raise ConfigError(f"{p}: nodes: a node id is given twice")
        raw["nodes"] = nodes
    raw.setdefault("data_dir", "data")  # omitted dirs, too, sit next to the file, not the cwd
    raw.setdefault("log_dir", "logs")
    for key in ("data_dir", "log_dir"):
        if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
            raw[key] = str(p.resolve().parent / raw[key])
    return parse_config(raw, str(p))
