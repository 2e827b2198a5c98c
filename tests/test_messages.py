"""Wire messages: msgpack round trips and DecodeError, with a one-line reason, for everything else."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ledger.chain import genesis_block
from ledger.messages import (
    MAX_BATCH_TRANSFERS,
    MAX_COUNTER,
    MAX_MESSAGE_BYTES,
    MAX_REPLY_ITEMS,
    MAX_REQUEST_ITEMS,
    PROTOCOL_VERSION,
    AppendEntriesMessage,
    AppendEntriesResponse,
    BalanceReply,
    BatchReply,
    BalanceRequest,
    ChainReply,
    ChainRequest,
    DecodeError,
    Entry,
    EntryKind,
    ErrorReply,
    RedirectReply,
    RequestVoteMessage,
    RequestVoteResponse,
    StatusReply,
    StatusRequest,
    SubmitBatchRequest,
    SubmitReply,
    SubmitRequest,
    SubmitResults,
    Transfer,
    decode,
    encode,
    encode_batch_reply,
)

ENTRIES = (
    Entry(index=5, term=2, kind=EntryKind.NOOP),
    Entry(index=6, term=2, kind=EntryKind.TXS, data=b"\x00\xff binary \x93"),
)
TRANSFER = Transfer(tx_id="c1-42", sender="alice", recipient="bob", amount=10)

EVERY_MESSAGE: list[BaseModel] = [
    RequestVoteMessage(src=0, dst=1, term=3, last_log_index=7, last_log_term=2),
    RequestVoteResponse(src=1, dst=0, term=3, granted=True),
    RequestVoteResponse(src=2, dst=0, term=3, granted=False),
    AppendEntriesMessage(src=0, dst=2, term=3, prev_log_index=4, prev_log_term=2, entries=ENTRIES,
                         leader_commit=4, seq=9),
    AppendEntriesMessage(src=0, dst=2, term=1, prev_log_index=0, prev_log_term=0, leader_commit=0),
    AppendEntriesResponse(src=2, dst=0, term=3, success=True, match_index=6, seq=9),
    AppendEntriesResponse(src=2, dst=0, term=3, success=False, reject_index=4, conflict_term=1,
                          conflict_index=3),
    SubmitRequest(req_id="r1", transfer=TRANSFER),
    BalanceRequest(req_id="r2", account="alice"),
    StatusRequest(req_id="r3"),
    ChainRequest(req_id="r4"),
    ChainRequest(req_id="r5", start=3, end=10),
    SubmitReply(req_id="r1", tx_id="c1-42", status="committed", height=4, block_hash="ab" * 32),
    SubmitReply(req_id="r1", tx_id="c1-43", status="rejected", reason="unknown sender zed", height=5,
                block_hash="cd" * 32),
    BalanceReply(req_id="r2", account="alice", balance=90, exists=True, applied_index=12),
    StatusReply(req_id="r3", node_id=1, role="follower", term=3, leader_id=0, commit_index=6,
                last_applied=6, last_log_index=7, chain_height=2, head_hash="ef" * 32),
    StatusReply(req_id="r3", node_id=1, role="candidate", term=4, leader_id=None, commit_index=0,
                last_applied=0, last_log_index=0, chain_height=0, head_hash="00" * 32),
    ChainReply(req_id="r4", blocks=[genesis_block({"alice": 1, "bob": 2}).to_doc()], height=0),
    RedirectReply(req_id="r6", leader_id=2),
    RedirectReply(req_id="r6", leader_id=None),
    ErrorReply(req_id="", error="not ready, retry"),
    SubmitBatchRequest(req_id="b1", transfers=[("c1-42", "alice", "bob", 10), ("c1-43", "bob", "zed", -1)]),
    SubmitResults(req_id="b1", height=4, block_hash="ab" * 32, results=[
        ("c1-42", "committed", None, "alice>bob:10"), ("c1-43", "rejected", "unknown sender bob", "bob>zed:-1")]),
    BatchReply(replies=[
        SubmitResults(req_id="b1", height=4, block_hash="ab" * 32, results=[("c1-42", "committed", None, "alice>bob:10")]),
        RedirectReply(req_id="b2", leader_id=1),
        ErrorReply(req_id="b3", error="leader overloaded, retry"),
    ]),
]


def raw_of(msg: BaseModel) -> dict:
    return msgpack.unpackb(encode(msg), raw=False)


def reason(raw_or_bytes) -> str:
    frame = raw_or_bytes if isinstance(raw_or_bytes, bytes) else msgpack.packb(raw_or_bytes, use_bin_type=True)
    with pytest.raises(DecodeError) as info:
        decode(frame)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


# ---- round trips ---------------------------------------------------------------------------------------


def test_every_message_type_is_covered():
    types = {m.type for m in EVERY_MESSAGE}  # type: ignore[attr-defined]
    assert types == {
        "request_vote", "request_vote_response", "append_entries", "append_entries_response",
        "submit", "balance", "status", "chain", "submit_reply", "balance_reply", "status_reply",
        "chain_reply", "redirect", "error", "submit_batch", "submit_results", "batch_reply",
    }


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: m.type)
def test_round_trip(msg):
    frame = encode(msg)
    assert isinstance(frame, bytes)
    back = decode(frame)
    assert type(back) is type(msg)
    assert back == msg
    assert encode(back) == frame
    raw = msgpack.unpackb(frame, raw=False)
    assert raw["v"] == PROTOCOL_VERSION == 1
    assert raw["type"] == msg.type


def test_entries_keep_bytes_and_kind():
    back = decode(encode(EVERY_MESSAGE[3]))
    assert back.entries == ENTRIES
    assert back.entries[1].data == b"\x00\xff binary \x93"
    assert back.entries[1].kind is EntryKind.TXS
    assert isinstance(back.entries, tuple)


def test_message_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not():
    base = AppendEntriesMessage(src=0, dst=1, term=1, prev_log_index=0, prev_log_term=0, leader_commit=0,
                                entries=(Entry(index=1, term=1, kind=EntryKind.TXS, data=b""),))
    def with_data(n: int) -> AppendEntriesMessage:
        return base.model_copy(update={"entries": (Entry(index=1, term=1, kind=EntryKind.TXS, data=b"x" * n),)})

    guess = MAX_MESSAGE_BYTES - len(encode(base))
    size = guess - (len(encode(with_data(guess))) - MAX_MESSAGE_BYTES)  # minus the larger bin header
    fits = with_data(size)
    frame = encode(fits)
    assert len(frame) == MAX_MESSAGE_BYTES
    assert decode(frame) == fits
    msg = reason(encode(with_data(size + 1)))
    assert msg == f"message of {MAX_MESSAGE_BYTES + 1} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit"


def test_oversized_garbage_is_rejected_before_parsing():
    assert "exceeds" in reason(b"\xc1" * (MAX_MESSAGE_BYTES + 10))


# ---- malformed frames ----------------------------------------------------------------------------------


def test_empty_and_truncated_frames():
    assert reason(b"").startswith("not a msgpack frame")
    frame = encode(EVERY_MESSAGE[0])
    assert reason(frame[:-3]).startswith("not a msgpack frame")
    assert reason(frame + b"\x01").startswith("not a msgpack frame")  # trailing bytes


@pytest.mark.parametrize("value,kind", [([1, 2], "list"), (7, "int"), ("hello", "str"), (None, "NoneType"),
                                        (b"\x01", "bytes"), (1.5, "float")])
def test_non_map_msgpack(value, kind):
    assert reason(msgpack.packb(value, use_bin_type=True)) == f"frame is a {kind}, not a map"


def test_map_with_non_string_keys():
    assert reason(msgpack.packb({1: 2})).startswith("not a msgpack frame")


@pytest.mark.parametrize("v", [0, 2, None, "1", True, 1.0])
def test_wrong_protocol_version(v):
    raw = raw_of(StatusRequest(req_id="r"))
    raw["v"] = v
    assert reason(raw) == f"unsupported protocol version {v!r}"


def test_missing_protocol_version():
    raw = raw_of(StatusRequest(req_id="r"))
    del raw["v"]
    assert reason(raw) == "unsupported protocol version None"


def test_unknown_type_tag():
    raw = raw_of(StatusRequest(req_id="r"))
    raw["type"] = "install_snapshot"
    msg = reason(raw)
    assert msg.startswith("invalid message:")
    assert "install_snapshot" in msg


@pytest.mark.parametrize("tag", ["request\nvote", "a\r\nb", "x\u2028y", "z\x85", "\x1e"])
def test_reason_stays_one_line_when_input_has_line_breaks(tag):
    raw = raw_of(StatusRequest(req_id="r"))
    raw["type"] = tag
    msg = reason(raw)
    assert repr(tag)[1:-1] in msg  # shown escaped
    raw = raw_of(StatusRequest(req_id="r"))
    raw[f"extra{tag}"] = 1
    assert reason(raw).startswith("invalid message: status.extra")


def test_missing_type_tag():
    raw = raw_of(StatusRequest(req_id="r"))
    del raw["type"]
    assert "discriminator 'type'" in reason(raw)


@pytest.mark.parametrize("field", ["src", "dst", "term", "last_log_index", "last_log_term"])
def test_missing_field(field):
    raw = raw_of(EVERY_MESSAGE[0])
    del raw[field]
    assert reason(raw) == f"invalid message: request_vote.{field}: Field required"


def test_missing_nested_field():
    raw = raw_of(EVERY_MESSAGE[3])
    del raw["entries"][1]["term"]
    assert reason(raw) == "invalid message: append_entries.entries.1.term: Field required"


def test_extra_field():
    raw = raw_of(EVERY_MESSAGE[1])
    raw["vote_for_me"] = True
    assert reason(raw) == "invalid message: request_vote_response.vote_for_me: Extra inputs are not permitted"


def test_extra_nested_field():
    raw = raw_of(SubmitRequest(req_id="r", transfer=TRANSFER))
    raw["transfer"]["memo"] = "x"
    assert reason(raw) == "invalid message: submit.transfer.memo: Extra inputs are not permitted"


@pytest.mark.parametrize("field", ["src", "dst", "term", "last_log_index", "last_log_term"])
@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None])
def test_wrong_type_where_int(field, value):
    raw = raw_of(EVERY_MESSAGE[0])
    raw[field] = value
    assert reason(raw).startswith(f"invalid message: request_vote.{field}: ")


@pytest.mark.parametrize("field,value", [
    ("prev_log_index", True), ("leader_commit", 1.0), ("seq", False),
    ("entries", [{"index": 1.0, "term": 1, "kind": "txs", "data": b""}]),
    ("entries", [{"index": 1, "term": True, "kind": "txs", "data": b""}]),
    ("entries", [{"index": 1, "term": 1, "kind": "txs", "data": "text, not bytes"}]),
    ("entries", [{"index": 1, "term": 1, "kind": "snapshot", "data": b""}]),
    ("entries", [{"index": 0, "term": 1, "kind": "txs", "data": b""}]),
    ("entries", "not a list"),
])
def test_wrong_types_in_append_entries(field, value):
    raw = raw_of(EVERY_MESSAGE[3])
    raw[field] = value
    assert reason(raw).startswith(f"invalid message: append_entries.{field}")


@pytest.mark.parametrize("amount", [True, 10.0, "10", None])
def test_transfer_amount_must_be_an_int(amount):
    raw = raw_of(SubmitRequest(req_id="r", transfer=TRANSFER))
    raw["transfer"]["amount"] = amount
    assert reason(raw).startswith("invalid message: submit.transfer.amount: ")


@pytest.mark.parametrize("field", ["term", "src", "last_log_index"])
def test_negative_values(field):
    raw = raw_of(EVERY_MESSAGE[0])
    raw[field] = -1
    assert reason(raw) == f"invalid message: request_vote.{field}: Input should be greater than or equal to 0"


@pytest.mark.parametrize("field", ["term", "last_log_index"])
def test_terms_and_indexes_stay_far_inside_64_bits(field):
    raw = raw_of(EVERY_MESSAGE[0])
    raw[field] = MAX_COUNTER
    assert getattr(decode(msgpack.packb(raw)), field) == MAX_COUNTER
    for too_big in (MAX_COUNTER + 1, 2**63, 2**64 - 1):
        raw[field] = too_big
        assert reason(raw).startswith(f"invalid message: request_vote.{field}: Input should be less than or equal")


def test_a_chain_request_from_beyond_64_bits_is_refused():
    raw = raw_of(ChainRequest(req_id="c"))
    raw["start"] = 2**63
    assert reason(raw).startswith("invalid message: chain.start: Input should be less than or equal")


def test_long_lists_and_maps_are_refused_before_validation():
    raw = raw_of(StatusRequest(req_id="r")) | {f"k{i}": 1 for i in range(100)}
    assert reason(raw) == f"a list or map in the frame is too long (at most {MAX_REQUEST_ITEMS} items, 64 keys)"
    raw = raw_of(BATCH) | {"transfers": [["t", "alice", "bob", 1]] * (MAX_REQUEST_ITEMS + 1)}
    assert "too long" in reason(raw)
    # a client takes longer lists, in the answers it gets
    replies = BatchReply(replies=[RedirectReply(req_id=f"r{i}", leader_id=1) for i in range(MAX_REQUEST_ITEMS + 1)])
    assert len(decode(encode(replies), MAX_REPLY_ITEMS).replies) == MAX_REQUEST_ITEMS + 1  # type: ignore[union-attr]


def test_node_id_out_of_range():
    raw = raw_of(EVERY_MESSAGE[0])
    raw["dst"] = 1024
    assert reason(raw) == "invalid message: request_vote.dst: Input should be less than or equal to 1023"


@pytest.mark.parametrize("field,value", [("tx_id", "has space"), ("sender", ""), ("recipient", "x" * 65)])
def test_bad_names_in_transfer(field, value):
    raw = raw_of(SubmitRequest(req_id="r", transfer=TRANSFER))
    raw["transfer"][field] = value
    assert reason(raw).startswith(f"invalid message: submit.transfer.{field}: String should match pattern")


def test_req_id_too_long():
    raw = raw_of(StatusRequest(req_id="r"))
    raw["req_id"] = "r" * 65
    assert reason(raw).startswith("invalid message: status.req_id: ")


def test_bad_literal_status_in_reply():
    raw = raw_of(EVERY_MESSAGE[12])
    raw["status"] = "pending"
    assert reason(raw).startswith("invalid message: submit_reply.status: ")


BATCH = SubmitBatchRequest(req_id="b", transfers=[("t1", "alice", "bob", 1)])


@pytest.mark.parametrize("row,where", [
    (["t 1", "alice", "bob", 1], "submit_batch.transfers.0.0: String should match pattern"),
    (["t1", "alice\n", "bob", 1], "submit_batch.transfers.0.1: String should match pattern"),
    (["t1", "alice", "", 1], "submit_batch.transfers.0.2: String should match pattern"),
    (["t1", "alice", "bob", True], "submit_batch.transfers.0.3: Input should be a valid integer"),
    (["t1", "alice", "bob", 1.5], "submit_batch.transfers.0.3: Input should be a valid integer"),
    (["t1", "alice", "bob", 2**63], "submit_batch.transfers.0.3: Input should be less than or equal to"),
    (["t1", "alice", "bob"], "submit_batch.transfers.0.3: Field required"),
    (["t1", "alice", "bob", 1, "memo"], "submit_batch.transfers.0: Tuple should have at most 4 items"),
    ({"tx_id": "t1"}, "submit_batch.transfers.0: Input should be a valid"),
])
def test_bad_rows_in_a_batch(row, where):
    raw = raw_of(BATCH)
    raw["transfers"].append(row)
    where = where.replace(".0", ".1", 1)  # the bad row comes second
    assert reason(raw).startswith(f"invalid message: {where}")


def test_batch_size_limits():
    raw = raw_of(BATCH)
    raw["transfers"] = []
    assert reason(raw).startswith("invalid message: submit_batch.transfers: List should have at least 1 item")
    raw["transfers"] = [[f"t{i}", "alice", "bob", 1] for i in range(MAX_BATCH_TRANSFERS)]
    assert len(decode(msgpack.packb(raw)).transfers) == MAX_BATCH_TRANSFERS
    raw["transfers"].append(["one-more", "alice", "bob", 1])
    assert reason(raw).startswith(f"invalid message: submit_batch.transfers: List should have at most "
                                  f"{MAX_BATCH_TRANSFERS} items")


def test_results_rows_are_checked():
    raw = raw_of(EVERY_MESSAGE[-2])
    raw["results"][1][1] = "pending"
    assert reason(raw).startswith("invalid message: submit_results.results.1.1: ")
    raw["results"][1] = ["c1-43", "rejected", None]
    assert reason(raw).startswith("invalid message: submit_results.results.1.3: Field required")


def test_batch_reply_fast_encoding_is_the_model_encoding():
    replies = EVERY_MESSAGE[-1].replies  # type: ignore[attr-defined]
    frame = encode_batch_reply(replies)
    assert frame == encode(BatchReply(replies=replies))
    assert decode(frame) == EVERY_MESSAGE[-1]


# ---- fuzzing -------------------------------------------------------------------------------------------


def _decode_or_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except DecodeError as exc:
        text = str(exc)
        assert len(text.splitlines()) == 1, text
    else:  # astronomically unlikely for random input, but then it must be a real message
        assert isinstance(msg, BaseModel)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_decode_error(frame):
    _decode_or_error(frame)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([encode(m) for m in EVERY_MESSAGE]), st.data())
def test_corrupted_frames_give_decode_error(frame, data):
    pos = data.draw(st.integers(0, len(frame) - 1))
    action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if action == "flip":
        bad = frame[:pos] + bytes([frame[pos] ^ data.draw(st.integers(1, 255))]) + frame[pos + 1:]
    elif action == "cut":
        bad = frame[:pos]
    else:
        bad = frame[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + frame[pos:]
    _decode_or_error(bad)


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=10), st.binary(max_size=10))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), c, max_size=4)),
                      max_leaves=12)
TYPES = sorted({m.type for m in EVERY_MESSAGE}) + ["nope"]  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TYPES), st.dictionaries(st.sampled_from(
    ["src", "dst", "term", "req_id", "entries", "transfer", "account", "start", "end", "granted",
     "success", "leader_commit", "prev_log_index", "prev_log_term", "blocks", "height", "x"]), values, max_size=8))
def test_random_maps_with_a_valid_header_give_decode_error_or_a_message(tag, fields):
    _decode_or_error(msgpack.packb({"v": 1, "type": tag, **fields}, use_bin_type=True))
