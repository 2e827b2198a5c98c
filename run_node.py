"""Start one ledger node: ``python run_node.py <id> [--config FILE] [--quiet]``."""

from __future__ import annotations

import argparse
import sqlite3
import sys

import zmq

from ledger.chain import ChainError
from ledger.config import ConfigError, load_config
from ledger.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_node.py", description="Run one raftledger node.")
    parser.add_argument("node_id", type=int, help="this node's id in the config")
    parser.add_argument("--config", metavar="FILE", help="TOML cluster config (default: server_config.py)")
    parser.add_argument("--quiet", action="store_true", help="log to the node's log file only")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        cfg.require_node(args.node_id)
    except ConfigError as exc:
        print(f"run_node.py: error: {exc}", file=sys.stderr)
        return 2
    from ledger.server import Server  # after argument checks, so usage errors stay fast

    try:
        server = Server(cfg, args.node_id, console=not args.quiet)
    except ChainError as exc:
        print(f"run_node.py: error: node {args.node_id}: {exc}; refusing to start", file=sys.stderr)
        return 1
    except StorageError as exc:
        print(f"run_node.py: error: node {args.node_id}: {exc}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as exc:
        # SQLite trims a torn tail itself; damage in the middle of the file ends up here.
        print(f"run_node.py: error: node {args.node_id}: {cfg.node_dir(args.node_id)} is damaged: {exc}; "
              "refusing to start", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:
        print(f"run_node.py: error: node {args.node_id}: cannot bind {cfg.nodes[args.node_id]}: {exc}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"run_node.py: error: node {args.node_id}: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 1
    except (TypeError, ValueError, KeyError) as exc:
        # Values in the store that no version of this program writes: damaged or edited by hand.
        print(f"run_node.py: error: node {args.node_id}: {cfg.node_dir(args.node_id)} holds invalid data "
              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); refusing to start",
              file=sys.stderr)
        return 1
    try:
        server.run()
    except StorageError as exc:  # a failed fdatasync of the log: the node cannot promise durability
        print(f"run_node.py: error: node {args.node_id}: {exc}; stopped (check the disk before restarting it: "
              "what the failed sync covered may be missing from it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
