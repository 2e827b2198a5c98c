"""The default cluster: three nodes on this machine, data in data/, logs in logs/.

``run_node.py`` and the client use this unless given ``--config FILE`` (a TOML file with the same
keys; see the README). Paths are relative to this file's directory.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

CONFIG = {
    "data_dir": str(_HERE / "data"),
    "log_dir": str(_HERE / "logs"),
    "nodes": {
        0: "tcp://127.0.0.1:5550",
        1: "tcp://127.0.0.1:5551",
        2: "tcp://127.0.0.1:5552",
    },
    "genesis": {
        "alice": 1000,
        "bob": 500,
        "carol": 250,
        "dave": 100,
    },
}
