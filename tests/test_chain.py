"""Blocks: canonical JSON, the RFC 6962 Merkle root, block hashes, genesis, chain verification.

Hashes are recomputed here by small, independent code written from the module docstring, so a
change of encoding in ledger.chain shows up as a test failure rather than passing silently.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.chain import (
    ZERO_HASH,
    Block,
    ChainError,
    canonical,
    genesis_block,
    make_block,
    merkle_root,
    transfer_leaf,
    verify_block,
    verify_chain,
)

# ---- independent reference code ------------------------------------------------------------------


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def leaf(x: bytes) -> bytes:
    return sha(b"\x00" + x)


def node(left: bytes, right: bytes) -> bytes:
    return sha(b"\x01" + left + right)


def ref_block_hash(height, prev_hash, term, index, timestamp, root, tx_count) -> str:
    """SHA-256 of the header as canonical JSON (sorted keys, no whitespace, UTF-8)."""
    header = {"height": height, "index": index, "merkle_root": root, "prev_hash": prev_hash,
              "term": term, "timestamp": timestamp, "tx_count": tx_count}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tx(tx_id: str, sender: str = "alice", recipient: str = "bob", amount: int = 1,
       status: str = "committed", reason: str | None = None) -> dict:
    return {"tx_id": tx_id, "sender": sender, "recipient": recipient, "amount": amount,
            "status": status, "reason": reason}


def build_chain(n: int = 4) -> list[Block]:
    """Genesis plus n-1 blocks, each with two transfers, at log indexes 2, 4, 6, ..."""
    chain = [genesis_block({"alice": 100, "bob": 5})]
    for h in range(1, n):
        prev = chain[-1]
        chain.append(make_block(h, prev.hash, 1, 2 * h, 1_700_000_000_000 + h,
                                [tx(f"t{h}a", amount=h), tx(f"t{h}b", "bob", "carol", 2 * h)]))
    return chain


# ---- canonical JSON ------------------------------------------------------------------------------


def test_canonical_is_sorted_compact_utf8():
    assert canonical({"b": 1, "a": [1, {"d": None, "c": "x"}]}) == b'{"a":[1,{"c":"x","d":null}],"b":1}'
    # UTF-8, not \u escapes
    assert canonical({"k": "\u00e9"}) == '{"k":"\u00e9"}'.encode("utf-8")
    assert canonical({"k": "\u00e9"}) == b'{"k":"\xc3\xa9"}'


def test_canonical_independent_of_dict_order():
    assert canonical({"x": 1, "y": 2, "z": 3}) == canonical({"z": 3, "x": 1, "y": 2})


# ---- Merkle root (RFC 6962) ----------------------------------------------------------------------


def test_merkle_empty_is_sha256_of_nothing():
    assert merkle_root([]) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle_root(iter(())) == hashlib.sha256(b"").hexdigest()


def test_merkle_one_leaf():
    assert merkle_root([b"a"]) == leaf(b"a").hex()
    # the leaf prefix matters: not the plain hash of the data
    assert merkle_root([b"a"]) != hashlib.sha256(b"a").hexdigest()


def test_merkle_two_leaves():
    assert merkle_root([b"a", b"b"]) == node(leaf(b"a"), leaf(b"b")).hex()


def test_merkle_three_leaves_split_at_two():
    # RFC 6962: split at the largest power of two below n (2 for n=3): ((a b) c), not (a (b c))
    expected = node(node(leaf(b"a"), leaf(b"b")), leaf(b"c"))
    assert merkle_root([b"a", b"b", b"c"]) == expected.hex()
    assert merkle_root([b"a", b"b", b"c"]) != node(leaf(b"a"), node(leaf(b"b"), leaf(b"c"))).hex()


def test_merkle_five_leaves_split_at_four():
    a, b, c, d, e = (leaf(x) for x in (b"a", b"b", b"c", b"d", b"e"))
    expected = node(node(node(a, b), node(c, d)), e)
    assert merkle_root([b"a", b"b", b"c", b"d", b"e"]) == expected.hex()


def test_merkle_order_matters():
    assert merkle_root([b"a", b"b"]) != merkle_root([b"b", b"a"])


def _ref_mth(items: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, written as in the RFC (k found by doubling)."""
    if not items:
        return sha(b"")
    if len(items) == 1:
        return leaf(items[0])
    k = 1
    while k * 2 < len(items):
        k *= 2
    return node(_ref_mth(items[:k]), _ref_mth(items[k:]))


@pytest.mark.parametrize("n", [*range(0, 18), 31, 33, 63, 64, 65, 100, 127, 129, 1000, 2000])
def test_merkle_matches_reference_for_many_sizes(n):
    items = [f"leaf-{i}".encode() for i in range(n)]
    assert merkle_root(items) == _ref_mth(items).hex()


# Vectors from the Certificate Transparency reference implementation's Merkle tree tests.
CT_LEAVES = [bytes.fromhex(h) for h in
             ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
              "606162636465666768696a6b6c6d6e6f"]]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


@pytest.mark.parametrize("n", range(1, 9))
def test_merkle_certificate_transparency_vectors(n):
    assert merkle_root(CT_LEAVES[:n]) == CT_ROOTS[n - 1]


# ---- block hash ------------------------------------------------------------------------------------


def test_block_hash_recomputed_independently():
    txs = [tx("t1", amount=7), tx("t2", "bob", "carol", 3, "rejected", "insufficient funds")]
    b = make_block(3, "ab" * 32, 5, 17, 1_700_000_000_123, txs)
    root = node(leaf(canonical(txs[0])), leaf(canonical(txs[1]))).hex()
    assert b.merkle_root == root
    assert b.hash == ref_block_hash(3, "ab" * 32, 5, 17, 1_700_000_000_123, root, 2)
    assert (b.height, b.prev_hash, b.term, b.index, b.timestamp, b.txs) == (3, "ab" * 32, 5, 17, 1_700_000_000_123, txs)
    assert len(b.hash) == 64 and b.hash == b.hash.lower()


def test_block_hash_uses_tx_leaves_as_canonical_json():
    # the leaf is canonical(tx): key order in the dict does not matter
    t = {"amount": 1, "tx_id": "x", "status": "committed", "reason": None, "sender": "a", "recipient": "b"}
    b1 = make_block(1, ZERO_HASH, 1, 1, 0, [t])
    b2 = make_block(1, ZERO_HASH, 1, 1, 0, [dict(reversed(list(t.items())))])
    assert b1.hash == b2.hash
    assert b1.merkle_root == leaf(b'{"amount":1,"reason":null,"recipient":"b","sender":"a","status":"committed","tx_id":"x"}').hex()


@pytest.mark.parametrize("field,value", [
    ("height", 4), ("prev_hash", "cd" * 32), ("term", 6), ("index", 18), ("timestamp", 1),
])
def test_every_header_field_changes_the_hash(field, value):
    args = {"height": 3, "prev_hash": "ab" * 32, "term": 5, "index": 17, "timestamp": 0}
    base = make_block(txs=[tx("t")], **args)
    changed = make_block(txs=[tx("t")], **{**args, field: value})
    assert base.hash != changed.hash


def test_header_and_doc_round_trip():
    b = build_chain(3)[2]
    assert b.header() == {"height": 2, "prev_hash": b.prev_hash, "term": 1, "index": 4,
                          "timestamp": 1_700_000_000_002, "merkle_root": b.merkle_root, "tx_count": 2}
    doc = json.loads(json.dumps(b.to_doc()))
    assert Block.model_validate(doc) == b
    assert set(doc) == {"height", "prev_hash", "term", "index", "timestamp", "merkle_root", "hash", "txs"}


def test_block_is_frozen_and_rejects_extra_fields():
    b = build_chain(2)[1]
    with pytest.raises(Exception):
        b.height = 9  # type: ignore[misc]
    with pytest.raises(Exception):
        Block.model_validate({**b.to_doc(), "extra": 1})


# ---- genesis ---------------------------------------------------------------------------------------


def test_genesis_block_is_deterministic():
    g1 = genesis_block({"alice": 1000, "bob": 500, "carol": 250})
    g2 = genesis_block({"carol": 250, "alice": 1000, "bob": 500})
    assert g1 == g2
    assert g1.hash == g2.hash
    assert g1.txs == [{"account": "alice", "balance": 1000}, {"account": "bob", "balance": 500},
                      {"account": "carol", "balance": 250}]
    assert (g1.height, g1.prev_hash, g1.term, g1.index, g1.timestamp) == (0, ZERO_HASH, 0, 0, 0)
    root = merkle_root(canonical(t) for t in g1.txs)
    assert g1.hash == ref_block_hash(0, ZERO_HASH, 0, 0, 0, root, 3)


def test_genesis_depends_on_balances():
    base = genesis_block({"alice": 1000, "bob": 500})
    assert genesis_block({"alice": 1000, "bob": 501}).hash != base.hash
    assert genesis_block({"alice": 1000, "bob": 500, "carol": 0}).hash != base.hash
    assert genesis_block({}).merkle_root == hashlib.sha256(b"").hexdigest()


# ---- verification ----------------------------------------------------------------------------------


def test_valid_chain_verifies_and_returns_head():
    chain = build_chain(5)
    assert verify_chain(chain) == chain[-1]
    # continuing from a known block
    assert verify_chain(chain[3:], prev=chain[2]) == chain[-1]
    assert verify_chain([], prev=chain[2]) == chain[2]
    assert verify_chain([]) is None


def _replace(chain: list[Block], height: int, block: Block) -> list[Block]:
    return chain[:height] + [block] + chain[height + 1:]


def _fail(chain: list[Block]) -> ChainError:
    with pytest.raises(ChainError) as info:
        verify_chain(chain)
    return info.value


def test_detects_changed_tx():
    chain = build_chain(5)
    b = chain[2]
    txs = [dict(b.txs[0], recipient="mallory")] + b.txs[1:]
    err = _fail(_replace(chain, 2, b.model_copy(update={"txs": txs})))
    assert err.height == 2
    assert "merkle" in err.reason
    assert str(err) == "chain invalid at height 2: merkle root does not match the transactions"


def test_detects_changed_amount():
    chain = build_chain(5)
    b = chain[3]
    txs = [b.txs[0], dict(b.txs[1], amount=b.txs[1]["amount"] + 1)]
    err = _fail(_replace(chain, 3, b.model_copy(update={"txs": txs})))
    assert err.height == 3
    assert "merkle" in err.reason


def test_detects_removed_tx():
    chain = build_chain(4)
    b = chain[1]
    err = _fail(_replace(chain, 1, b.model_copy(update={"txs": b.txs[:1]})))
    assert err.height == 1


def test_detects_broken_prev_hash_link():
    chain = build_chain(5)
    b = chain[2]
    # a self-consistent block (its own hash and root are right) that does not link to block 1
    forged = make_block(2, "f" * 64, b.term, b.index, b.timestamp, b.txs)
    err = _fail(_replace(chain, 2, forged))
    assert err.height == 2
    assert "prev_hash" in err.reason


def test_resealed_tampered_block_is_caught_by_the_next_link():
    chain = build_chain(5)
    b = chain[2]
    txs = [dict(b.txs[0], amount=999)] + b.txs[1:]
    resealed = make_block(b.height, b.prev_hash, b.term, b.index, b.timestamp, txs)
    verify_block(resealed, chain[1])  # fine on its own
    err = _fail(_replace(chain, 2, resealed))
    assert err.height == 3
    assert "prev_hash" in err.reason


def test_detects_height_gap():
    chain = build_chain(5)
    err = _fail(chain[:2] + chain[3:])  # 0, 1, 3, 4
    assert err.height == 3
    assert str(err) == "chain invalid at height 3: height 3 follows 1"


def test_detects_genesis_not_at_height_zero():
    chain = build_chain(3)
    err = _fail(chain[1:])
    assert err.height == 1


def test_detects_bad_merkle_root():
    chain = build_chain(5)
    b = chain[1]
    err = _fail(_replace(chain, 1, b.model_copy(update={"merkle_root": "0" * 64})))
    assert err.height == 1
    assert err.reason == "merkle root does not match the transactions"


def test_detects_bad_block_hash():
    chain = build_chain(5)
    b = chain[4]
    err = _fail(_replace(chain, 4, b.model_copy(update={"hash": "1" * 64})))
    assert err.height == 4
    assert err.reason == "block hash does not match its header"


def test_detects_changed_header_field_without_rehash():
    chain = build_chain(4)
    b = chain[2]
    err = _fail(_replace(chain, 2, b.model_copy(update={"timestamp": b.timestamp + 1})))
    assert err.height == 2
    assert err.reason == "block hash does not match its header"


def test_detects_non_increasing_log_index():
    chain = build_chain(4)
    b = chain[2]
    forged = make_block(2, chain[1].hash, b.term, chain[1].index, b.timestamp, b.txs)
    err = _fail(_replace(chain, 2, forged))
    assert err.height == 2
    assert "log index" in err.reason


def test_names_the_first_bad_height_when_several_are_bad():
    chain = build_chain(6)
    bad = list(chain)
    for h in (2, 4):
        bad[h] = bad[h].model_copy(update={"merkle_root": "0" * 64})
    assert _fail(bad).height == 2


def test_genesis_with_nonzero_prev_hash_is_rejected():
    g = make_block(0, "a" * 64, 0, 0, 0, [])
    with pytest.raises(ChainError) as info:
        verify_block(g, None)
    assert info.value.height == 0


@given(
    tx_id=st.from_regex(r"[A-Za-z0-9_.:@-]{1,64}", fullmatch=True),
    sender=st.from_regex(r"[A-Za-z0-9_.:@-]{1,64}", fullmatch=True),
    recipient=st.from_regex(r"[A-Za-z0-9_.:@-]{1,64}", fullmatch=True),
    amount=st.integers(min_value=-(10**16), max_value=10**16),
    rejected=st.booleans(),
)
def test_transfer_leaf_is_exactly_canonical(tx_id: str, sender: str, recipient: str, amount: int,
                                            rejected: bool) -> None:
    status, reason = ("rejected", f"unknown sender {sender}") if rejected else ("committed", None)
    doc = {"tx_id": tx_id, "sender": sender, "recipient": recipient, "amount": amount,
           "status": status, "reason": reason}
    assert transfer_leaf(tx_id, sender, recipient, amount, status, reason) == canonical(doc)
