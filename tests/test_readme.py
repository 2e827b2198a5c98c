"""The README's block-hash recipe, run as written against blocks the ledger builds."""

from __future__ import annotations

import re
from pathlib import Path

from ledger.chain import genesis_block, make_block

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_recipe() -> dict:
    text = README.read_text()
    block = re.search(r"Recompute a block's hash yourself:\n\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its hash recipe"
    namespace: dict = {}
    exec(block.group(1), namespace)
    return namespace


def test_readme_recipe_checks_real_blocks() -> None:
    check = readme_recipe()["check"]
    gen = genesis_block({"bob": 5, "alice": 7})
    txs = [{"tx_id": f"t{i}", "sender": "alice", "recipient": "bob", "amount": i + 1,
            "status": "committed", "reason": None} for i in range(5)]
    blocks = [gen] + [make_block(h, gen.hash, 3, 10 + h, 1764790000000, txs[:h]) for h in range(1, 6)]
    for b in blocks:
        assert check(b.to_doc())
    tampered = blocks[3].to_doc()
    tampered["txs"][0]["amount"] = 999
    assert not check(tampered)


def test_readme_quickstart_commands_match_ci() -> None:
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = "pip install -e '.[test]' && python -m pytest -q"
    assert test_cmd in text and test_cmd in ci
    assert "python -m ledger.demo" in text
