"""The ``ledger`` command line: usage errors exit 2 with one line on stderr; no cluster exits 3."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ledger.client import EXIT_UNAVAILABLE, EXIT_USAGE, build_parser, main
from ledger.cluster import free_ports


def run(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code  # type: ignore[return-value]


def one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0]
    return lines[0]


def dead_cluster(tmp_path: Path, n: int = 2) -> Path:
    ports = free_ports(n)
    nodes = "\n".join(f'{i} = "tcp://127.0.0.1:{p}"' for i, p in enumerate(ports))
    p = tmp_path / "dead.toml"
    p.write_text(f'data_dir = "data"\n[nodes]\n{nodes}\n[genesis]\nalice = 10\n', encoding="utf-8")
    return p


# ---- parsing ---------------------------------------------------------------------------------------


def test_parser_accepts_good_arguments(tmp_path):
    p = build_parser()
    a = p.parse_args(["--config", "c.toml", "submit", "alice", "bob", "25", "--tx-id", "c1-42", "--json"])
    assert (a.command, a.sender, a.recipient, a.amount, a.tx_id, a.config, a.json) == (
        "submit", "alice", "bob", 25, "c1-42", "c.toml", True)
    a = p.parse_args(["chain", "--from", "3", "--to", "7", "--node", "1", "--timeout", "2.5"])
    assert (a.start, a.end, a.node, a.timeout) == (3, 7, 1, 2.5)
    a = p.parse_args(["chain"])
    assert (a.start, a.end, a.node) == (0, None, None)
    a = p.parse_args(["balance", "bob"])
    assert a.account == "bob" and not hasattr(a, "config") and not hasattr(a, "timeout")


@pytest.mark.parametrize("argv,needle", [
    (["submit", "alice", "bob", "2.5"], "amount must be a whole number, not '2.5'"),
    (["submit", "alice", "bob", "ten"], "amount must be a whole number, not 'ten'"),
    (["submit", "bad name", "bob", "5"], "invalid sender 'bad name'"),
    (["submit", "alice", "b/ob", "5"], "invalid recipient 'b/ob'"),
    (["submit", "alice", "bob", "5", "--tx-id", "x" * 65], "invalid transaction id"),
    (["balance", "caf\u00e9"], "invalid account"),
    (["balance", "alice\n"], "invalid account 'alice\\n'"),
    (["submit", "alice", "bob\n", "5"], "invalid recipient 'bob\\n'"),
    (["submit", "alice", "bob"], "the following arguments are required: amount"),
    (["submit"], "the following arguments are required: sender, recipient, amount"),
    (["balance"], "the following arguments are required: account"),
    ([], "the following arguments are required: command"),
    (["transfer", "alice", "bob", "5"], "invalid choice: 'transfer'"),
    (["status", "--bogus"], "unrecognized arguments: --bogus"),
    (["chain", "--from", "-1"], "height must be a whole number from 0 to 4611686018427387904, not '-1'"),
    (["chain", "--to", "x"], "height must be a whole number from 0 to 4611686018427387904, not 'x'"),
    (["chain", "--from", "99999999999999999999999"], "height must be a whole number from 0 to"),
    (["chain", "--from", "5", "--to", "2"], "--from 5 is above --to 2"),
    (["submit", "alice", "bob", "1_000"], "amount must be a whole number, not '1_000'"),
    (["submit", "alice", "bob", " +7 "], "amount must be a whole number, not ' +7 '"),
    (["submit", "alice", "bob", "\u0662\u0665"], "amount must be a whole number"),
    (["chain", "--node", "one"], "argument --node: invalid int value: 'one'"),
    (["--timeout", "soon", "status"], "argument --timeout: invalid float value: 'soon'"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, needle):
    assert run(argv) == EXIT_USAGE
    line = one_line_error(capsys)
    assert needle in line
    assert line.startswith("ledger")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_timeout_must_be_positive(capsys, value):
    assert run(["--timeout", value, "status"]) == EXIT_USAGE
    assert one_line_error(capsys) == "ledger: error: --timeout must be a positive, finite number of seconds"


def test_timeout_after_the_subcommand_is_checked_too(capsys):
    assert run(["status", "--timeout", "0"]) == EXIT_USAGE
    assert one_line_error(capsys) == "ledger: error: --timeout must be a positive, finite number of seconds"


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nope.toml"
    assert run(["--config", str(missing), "status"]) == EXIT_USAGE
    assert one_line_error(capsys) == f"ledger: error: cannot read config {missing}: No such file or directory"


def test_invalid_config_file(capsys, tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[nodes]\n0 = "nowhere"\n[genesis]\nalice = 1\n', encoding="utf-8")
    assert run(["status", "--config", str(p)]) == EXIT_USAGE
    line = one_line_error(capsys)
    assert line.startswith(f"ledger: error: {p}: nodes: node 0: endpoint 'nowhere'")


def test_node_not_in_config(capsys, tmp_path):
    assert run(["--config", str(dead_cluster(tmp_path)), "chain", "--node", "7"]) == EXIT_USAGE
    assert one_line_error(capsys) == "ledger: error: node 7 is not in the config"


@pytest.mark.parametrize("argv,reason", [
    (["chain", "--node", "7"], "error: node 7 is not in the config"),
    (["submit", "alice", "bob", "1.5"], "error: argument amount: amount must be a whole number, not '1.5'"),
    (["bogus"], "error: argument command: invalid choice: 'bogus'"),
])
def test_json_usage_errors_print_the_error_document_too(capsys, tmp_path, argv, reason):
    assert run(["--config", str(dead_cluster(tmp_path)), "--json", *argv]) == EXIT_USAGE
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["exit_code"] == EXIT_USAGE and doc["error"].startswith(reason)
    assert len(err.splitlines()) == 1 and reason in err


# ---- cluster unavailable --------------------------------------------------------------------------------


def test_status_with_no_node_up_exits_3_quickly(capsys, tmp_path):
    cfg = dead_cluster(tmp_path, 2)
    start = time.monotonic()
    assert run(["--config", str(cfg), "--timeout", "1", "status"]) == EXIT_UNAVAILABLE
    assert time.monotonic() - start < 5
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "ledger: cluster unavailable: no node answered\n"


def test_submit_with_no_node_up_exits_3_after_its_timeout(capsys, tmp_path):
    cfg = dead_cluster(tmp_path, 2)
    start = time.monotonic()
    assert run(["--config", str(cfg), "--timeout", "0.3", "submit", "alice", "bob", "1"]) == EXIT_UNAVAILABLE
    assert time.monotonic() - start < 5
    out, err = capsys.readouterr()
    assert out == ""
    assert err in ("ledger: cluster unavailable after 0.3s: no answer from nodes 0, 1\n",
                   "ledger: cluster unavailable after 0.3s: no answer from node 0\n",
                   "ledger: cluster unavailable after 0.3s: no answer from node 1\n")


def test_balance_with_no_node_up_exits_3(capsys, tmp_path):
    cfg = dead_cluster(tmp_path, 1)
    assert run(["--config", str(cfg), "--timeout", "0.2", "balance", "alice"]) == EXIT_UNAVAILABLE
    assert capsys.readouterr().err == "ledger: cluster unavailable after 0.2s: no answer from node 0\n"


def test_chain_with_no_node_up_exits_3(capsys, tmp_path):
    cfg = dead_cluster(tmp_path, 1)
    assert run(["--config", str(cfg), "chain"]) == EXIT_UNAVAILABLE
    assert capsys.readouterr().err == "ledger: cluster unavailable: no node answered\n"


@pytest.mark.parametrize("argv", [["submit", "alice", "bob", "1"], ["balance", "alice"], ["chain"], ["status"],
                                  ["verify"]])
def test_json_commands_print_one_document_when_the_cluster_is_down(capsys, tmp_path, argv):
    cfg = dead_cluster(tmp_path, 1)
    assert run(["--config", str(cfg), "--timeout", "0.2", "--json", *argv]) == EXIT_UNAVAILABLE
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["exit_code"] == EXIT_UNAVAILABLE and doc["error"].startswith("cluster unavailable")
    assert err == f"ledger: {doc['error']}\n"


def test_status_gives_up_within_its_timeout(tmp_path):
    cfg = dead_cluster(tmp_path, 3)
    start = time.monotonic()
    assert run(["--config", str(cfg), "--timeout", "0.2", "status"]) == EXIT_UNAVAILABLE
    assert time.monotonic() - start < 0.6  # all nodes asked at once, 0.2 s in all


def test_verify_with_no_node_up_exits_3(capsys, tmp_path):
    cfg = dead_cluster(tmp_path, 1)
    assert run(["--config", str(cfg), "verify"]) == EXIT_UNAVAILABLE
    out, err = capsys.readouterr()
    assert (out, err) == ("", "ledger: cluster unavailable: no node answered\n")
