"""Cluster configuration: TOML loading, every error path as a one-line ConfigError naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ledger.config import ClusterConfig, ConfigError, load_config, parse_config
from ledger.logsetup import setup_node_logging
from ledger.state import MAX_AMOUNT

NODES = """
[nodes]
0 = "tcp://127.0.0.1:6000"
1 = "tcp://127.0.0.1:6001"
2 = "tcp://localhost:6002"
"""
GENESIS = """
[genesis]
alice = 1000
bob = 0
"""


def write(tmp_path: Path, text: str, name: str = "cluster.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def config_error(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(str(p)), msg  # names the file
    return msg


# ---- valid files ----------------------------------------------------------------------------------


def test_valid_file_loads(tmp_path):
    p = write(tmp_path, 'tick_ms = 5\nheartbeat_ms = 20\nelection_timeout_ms = [100, 200]\n' + NODES + GENESIS)
    cfg = load_config(p)
    assert cfg.nodes == {0: "tcp://127.0.0.1:6000", 1: "tcp://127.0.0.1:6001", 2: "tcp://localhost:6002"}
    assert cfg.genesis == {"alice": 1000, "bob": 0}
    assert (cfg.tick_ms, cfg.heartbeat_ms, cfg.election_timeout_ms) == (5, 20, (100, 200))
    assert cfg.require_node(1) == "tcp://127.0.0.1:6001"


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, NODES + GENESIS))
    assert (cfg.tick_ms, cfg.heartbeat_ms, cfg.election_timeout_ms) == (10, 50, (300, 600))
    # omitted dirs sit next to the file too, whatever the working directory
    assert (cfg.data_dir, cfg.log_dir) == (tmp_path / "data", tmp_path / "logs")


def test_relative_dirs_resolve_against_the_file(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    write(sub, 'data_dir = "state"\nlog_dir = "../logs"\n' + NODES + GENESIS)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(Path("conf") / "cluster.toml")
    assert cfg.data_dir == sub.resolve() / "state"
    assert cfg.log_dir == sub.resolve() / "../logs"
    assert cfg.log_dir.resolve() == (tmp_path / "logs").resolve()
    assert cfg.node_dir(2) == sub.resolve() / "state" / "node-2"
    assert cfg.log_file(1) == sub.resolve() / "../logs" / "node-1.log"


def test_absolute_dirs_are_kept(tmp_path):
    abs_dir = tmp_path / "elsewhere"
    cfg = load_config(write(tmp_path, f'data_dir = "{abs_dir}"\n' + NODES + GENESIS))
    assert cfg.data_dir == abs_dir


def test_default_server_config_loads():
    import server_config

    cfg = load_config()
    assert isinstance(cfg, ClusterConfig)
    assert cfg.nodes == {0: "tcp://127.0.0.1:5550", 1: "tcp://127.0.0.1:5551", 2: "tcp://127.0.0.1:5552"}
    assert cfg.genesis == {"alice": 1000, "bob": 500, "carol": 250, "dave": 100}
    assert cfg.data_dir.is_absolute()
    assert cfg.data_dir == Path(server_config.__file__).resolve().parent / "data"


def test_require_node_unknown_id(tmp_path):
    cfg = load_config(write(tmp_path, NODES + GENESIS))
    with pytest.raises(ConfigError, match=r"node id 7 is not in the config \(ids: 0, 1, 2\)"):
        cfg.require_node(7)


# ---- error paths -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value) == f"cannot read config {p}: No such file or directory"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path)


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes(NODES.encode() + b'\n[genesis]\n"caf\xe9" = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value).startswith(f"cannot read config {p}")
    assert "\n" not in str(info.value)


def test_invalid_toml(tmp_path):
    msg = config_error(tmp_path, "nodes = \n" + GENESIS)
    assert "not valid TOML" in msg
    assert "line 1" in msg


def test_missing_nodes(tmp_path):
    msg = config_error(tmp_path, GENESIS)
    assert msg.endswith("nodes: Field required")


def test_empty_nodes(tmp_path):
    msg = config_error(tmp_path, "[nodes]\n" + GENESIS)
    assert msg.endswith("nodes: at least one node is required")


def test_missing_genesis(tmp_path):
    msg = config_error(tmp_path, NODES)
    assert msg.endswith("genesis: Field required")


@pytest.mark.parametrize("endpoint", [
    "127.0.0.1:6000", "tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000",
    "udp://127.0.0.1:6000", "tcp://bad host:6000", "tcp://127.0.0.1:60x0", "",
    "tcp://127.0.0.1:6001\\n",  # a trailing newline (TOML escape) is not a port
])
def test_bad_endpoint(tmp_path, endpoint):
    msg = config_error(tmp_path, f'[nodes]\n0 = "tcp://127.0.0.1:6000"\n1 = "{endpoint}"\n' + GENESIS)
    value = endpoint.replace("\\n", "\n")  # as TOML reads it
    assert f"nodes: node 1: endpoint {value!r} is not tcp://HOST:PORT" in msg


@pytest.mark.parametrize("host", ["999.1.1.1", "10.0.0.256", "1.2.3"])
def test_an_address_that_is_none_is_refused(tmp_path, host):
    msg = config_error(tmp_path, f'[nodes]\n0 = "tcp://{host}:6000"\n' + GENESIS)
    assert msg.endswith(f"nodes: node 0: {host} in tcp://{host}:6000 is not an IP address")


def test_ipv6_endpoint_accepted(tmp_path):
    cfg = load_config(write(tmp_path, '[nodes]\n0 = "tcp://[::1]:6000"\n' + GENESIS))
    assert cfg.nodes == {0: "tcp://[::1]:6000"}


def test_endpoint_not_a_string(tmp_path):
    msg = config_error(tmp_path, "[nodes]\n0 = 6000\n" + GENESIS)
    assert ": nodes.0: " in msg


def test_duplicate_endpoint(tmp_path):
    msg = config_error(tmp_path, '[nodes]\n0 = "tcp://127.0.0.1:6000"\n1 = "tcp://127.0.0.1:6000"\n' + GENESIS)
    assert msg.endswith("nodes: node 1: endpoint tcp://127.0.0.1:6000 is used twice")


def test_non_integer_node_id(tmp_path):
    msg = config_error(tmp_path, '[nodes]\nzero = "tcp://127.0.0.1:6000"\n' + GENESIS)
    assert msg.endswith("nodes: node ids must be integers")


def test_node_id_given_twice(tmp_path):
    # "1" and "01" are distinct TOML keys but the same node id: one would silently vanish
    msg = config_error(tmp_path, '[nodes]\n1 = "tcp://127.0.0.1:6000"\n01 = "tcp://127.0.0.1:6001"\n' + GENESIS)
    assert "nodes:" in msg and "twice" in msg


@pytest.mark.parametrize("node_id", ["-1", "1024"])
def test_node_id_out_of_range(tmp_path, node_id):
    msg = config_error(tmp_path, f'[nodes]\n{node_id} = "tcp://127.0.0.1:6000"\n' + GENESIS)
    assert f": nodes.{int(node_id)}.[key]: " in msg


def test_negative_genesis_balance(tmp_path):
    msg = config_error(tmp_path, NODES + "[genesis]\nalice = -1\n")
    assert msg.endswith("genesis.alice: Input should be greater than or equal to 0")


def test_genesis_balance_over_max(tmp_path):
    msg = config_error(tmp_path, NODES + f"[genesis]\nalice = {MAX_AMOUNT + 1}\n")
    assert "genesis.alice: Input should be less than or equal to" in msg


@pytest.mark.parametrize("value", ["1.5", "true", '"10"'])
def test_genesis_balance_must_be_an_integer(tmp_path, value):
    msg = config_error(tmp_path, NODES + f"[genesis]\nalice = {value}\n")
    assert ": genesis.alice: " in msg


@pytest.mark.parametrize("name", ["bad name", "", "x" * 65, "caf\u00e9", "a/b"])
def test_bad_account_name(tmp_path, name):
    msg = config_error(tmp_path, NODES + f'[genesis]\n"{name}" = 5\n')
    assert f": genesis.{name}.[key]: String should match pattern" in msg


@pytest.mark.parametrize("key", ["a\\nb", "a\\u2028b", "a\\rb"])
def test_error_stays_one_line_when_a_key_has_a_line_break(tmp_path, key):
    # TOML escapes in quoted keys: the key itself holds the line break
    msg = config_error(tmp_path, NODES + f'[genesis]\n"{key}" = 5\n')
    assert ": genesis.a" in msg and "String should match pattern" in msg
    msg = config_error(tmp_path, f'"{key}" = 1\n' + NODES + GENESIS)
    assert msg.endswith("Extra inputs are not permitted")


def test_unknown_key(tmp_path):
    msg = config_error(tmp_path, "data_dirr = 'x'\n" + NODES + GENESIS)
    assert msg.endswith("data_dirr: Extra inputs are not permitted")


def test_bad_election_timeout_ordering(tmp_path):
    msg = config_error(tmp_path, "election_timeout_ms = [600, 300]\n" + NODES + GENESIS)
    assert msg.endswith("election_timeout_ms: the lower bound is above the upper bound")


def test_election_timeout_wrong_shape(tmp_path):
    msg = config_error(tmp_path, "election_timeout_ms = [300, 400, 500]\n" + NODES + GENESIS)
    assert ": election_timeout_ms: " in msg


def test_heartbeat_too_slow_for_election_timeout(tmp_path):
    msg = config_error(tmp_path, "heartbeat_ms = 150\nelection_timeout_ms = [300, 600]\n" + NODES + GENESIS)
    assert msg.endswith("heartbeat_ms must be at most a third of the election timeout")


def test_tick_longer_than_heartbeat(tmp_path):
    msg = config_error(tmp_path, "tick_ms = 60\nheartbeat_ms = 50\n" + NODES + GENESIS)
    assert msg.endswith("tick_ms must not exceed heartbeat_ms")


@pytest.mark.parametrize("key", ["tick_ms", "heartbeat_ms"])
def test_timings_must_be_integers(tmp_path, key):
    msg = config_error(tmp_path, f"{key} = true\n" + NODES + GENESIS)
    assert msg.endswith(f": {key}: Input should be a valid integer")


@pytest.mark.parametrize("value", ["0", "1001"])
def test_tick_out_of_range(tmp_path, value):
    msg = config_error(tmp_path, f"tick_ms = {value}\n" + NODES + GENESIS)
    assert ": tick_ms: " in msg


def test_parse_config_names_its_source():
    with pytest.raises(ConfigError) as info:
        parse_config({"nodes": {0: "tcp://127.0.0.1:1"}}, "server_config.py")
    assert str(info.value) == "server_config.py: genesis: Field required"


def test_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path, NODES + GENESIS))
    with pytest.raises(Exception):
        cfg.tick_ms = 1  # type: ignore[misc]


def test_log_level(tmp_path):
    assert load_config(write(tmp_path, NODES + GENESIS)).log_level == "info"
    assert load_config(write(tmp_path, 'log_level = "debug"\n' + NODES + GENESIS)).log_level == "debug"
    msg = config_error(tmp_path, 'log_level = "verbose"\n' + NODES + GENESIS)
    assert ": log_level: " in msg and "'debug', 'info', 'warning' or 'error'" in msg


@pytest.mark.parametrize("level, kept", [("debug", ["committed", "block_appended", "peer_unreachable"]),
                                         ("info", ["block_appended", "peer_unreachable"]),
                                         ("warning", ["peer_unreachable"])])
def test_lines_below_the_log_level_are_not_written(tmp_path, level, kept):
    log = setup_node_logging(tmp_path / "node-0.log", 0, lambda: {"term": 3}, console=False, level=level)
    log.debug("committed", commit_index=7)
    log.info("block_appended", height=1)
    log.warning("peer_unreachable", peer=2)
    lines = [json.loads(line) for line in (tmp_path / "node-0.log").read_text().splitlines()]
    assert [d["event"] for d in lines] == kept
    assert all(d["node"] == 0 and d["term"] == 3 for d in lines)


def test_batch_interval_ms(tmp_path):
    assert load_config(write(tmp_path, NODES + GENESIS)).batch_interval_ms == 5
    assert load_config(write(tmp_path, "batch_interval_ms = 0\n" + NODES + GENESIS)).batch_interval_ms == 0
    for value in ("-1", "101", "2.5", '"5"'):
        msg = config_error(tmp_path, f"batch_interval_ms = {value}\n" + NODES + GENESIS)
        assert ": batch_interval_ms: " in msg, msg


def test_a_setting_written_below_genesis_is_refused_not_made_an_account(tmp_path):
    msg = config_error(tmp_path, NODES + GENESIS + "batch_interval_ms = 20\n")
    assert "genesis: " in msg and "'batch_interval_ms' has the name of a top-level setting" in msg, msg
    assert "before [nodes] and [genesis]" in msg
