"""Every message that crosses a process boundary, as pydantic models, and their wire encoding.

Each message carries a ``type`` tag and the protocol version ``v``. Frames are msgpack maps;
decoding validates them against the tagged union, so anything that does not fit is rejected
with a one-line reason instead of reaching the node.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar, Union

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StrictBytes, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
# The largest frame a node accepts. A full AppendEntries batch stays well below it
# (see raft.MAX_APPEND_BYTES); ZeroMQ's MAXMSGSIZE enforces it at the socket.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

NAME_PATTERN = r"^[A-Za-z0-9_.:@-]{1,64}$"  # pydantic (Rust regex): $ is the end of the text
AccountName = Annotated[str, Field(pattern=NAME_PATTERN)]
TxId = Annotated[str, Field(pattern=NAME_PATTERN)]
NodeId = Annotated[int, Field(ge=0, le=1023, strict=True)]
# Terms and indexes stay far inside SQLite's 64-bit integers, so that term + 1 still fits: a
# forged term of 2**63 once crashed a node when it stored it, and the cluster with it.
MAX_COUNTER = 2**62
Index = Annotated[int, Field(ge=0, le=MAX_COUNTER, strict=True)]
Term = Annotated[int, Field(ge=0, le=MAX_COUNTER, strict=True)]
# Any 64-bit integer: the ledger rejects amounts <= 0 or above its maximum, with a reason.
Amount = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
# A transfer as (tx_id, sender, recipient, amount): how batches carry it, on the wire and in the log.
TransferRow = tuple[TxId, AccountName, AccountName, Amount]


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    v: Literal[1] = PROTOCOL_VERSION


class EntryKind(str, Enum):
    NOOP = "noop"  # appended by a new leader to commit its term (Raft 5.4.2)
    TXS = "txs"  # a batch of transfers


class Entry(BaseModel):
    """One Raft log entry. ``data`` is opaque to Raft (a batch, see state.encode_batch)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    index: Annotated[int, Field(ge=1, strict=True)]
    term: Annotated[int, Field(ge=1, strict=True)]
    kind: EntryKind
    data: StrictBytes = b""


class Transfer(BaseModel):
    """A client's transfer. Shape is checked here; the ledger rules are checked when applied."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    tx_id: TxId
    sender: AccountName
    recipient: AccountName
    amount: Amount

    def row(self) -> TransferRow:
        return (self.tx_id, self.sender, self.recipient, self.amount)


# ---- Raft messages (node to node, one-way; a reply is a new message) -------------------------


class RaftMessage(_Msg):
    src: NodeId
    dst: NodeId
    term: Term


class RequestVoteMessage(RaftMessage):
    type: Literal["request_vote"] = "request_vote"
    last_log_index: Index
    last_log_term: Term
    # Pre-vote (Raft dissertation 9.6): "would you vote for me in `term`?" Changes no state.
    pre_vote: bool = False


class RequestVoteResponse(RaftMessage):
    type: Literal["request_vote_response"] = "request_vote_response"
    granted: bool
    pre_vote: bool = False


class AppendEntriesMessage(RaftMessage):
    type: Literal["append_entries"] = "append_entries"
    prev_log_index: Index
    prev_log_term: Term
    entries: tuple[Entry, ...] = ()
    leader_commit: Index
    # Echoed in the response; lets the leader confirm its leadership for reads (ReadIndex).
    seq: Index = 0


class AppendEntriesResponse(RaftMessage):
    type: Literal["append_entries_response"] = "append_entries_response"
    success: bool
    # On success: the last index known to match the leader. On failure: prev_log_index rejected.
    match_index: Index = 0
    reject_index: Index = 0
    # Hint for a fast back-off (Raft paper 5.3, "optimization"): the term of the conflicting entry
    # (0 if the follower's log is too short) and the first index the follower holds with that term.
    conflict_term: Term = 0
    conflict_index: Index = 0
    seq: Index = 0


# ---- Client messages ---------------------------------------------------------------------------


class ClientRequest(_Msg):
    req_id: Annotated[str, Field(max_length=64)]


class SubmitRequest(ClientRequest):
    type: Literal["submit"] = "submit"
    transfer: Transfer


class BalanceRequest(ClientRequest):
    type: Literal["balance"] = "balance"
    account: AccountName


class StatusRequest(ClientRequest):
    type: Literal["status"] = "status"


class ChainRequest(ClientRequest):
    type: Literal["chain"] = "chain"
    start: Index = 0
    end: Index | None = None  # inclusive; None means the head


MAX_BATCH_TRANSFERS = 2048  # transfers in one SubmitBatchRequest


class SubmitBatchRequest(ClientRequest):
    """Many transfers in one frame: a client with many in flight (a load generator, a busy
    application) sends them together, for one frame, one decode and one socket call.

    Each transfer is answered by a ``SubmitReply`` carrying this ``req_id`` and its ``tx_id``; a
    redirect or an error for the whole batch carries this ``req_id``. Every answer to a batch
    comes in ``BatchReply`` frames. Rows are (tx_id, sender, recipient, amount): as a tuple
    they validate about four times faster than a list of ``Transfer`` models.
    """

    type: Literal["submit_batch"] = "submit_batch"
    transfers: Annotated[list[TransferRow], Field(min_length=1, max_length=MAX_BATCH_TRANSFERS)]


class ClientReply(_Msg):
    req_id: str


class SubmitReply(ClientReply):
    type: Literal["submit_reply"] = "submit_reply"
    tx_id: str
    status: Literal["committed", "rejected"]
    reason: str | None = None
    height: int
    block_hash: str
    # The transfer this id was applied with, as "sender>recipient:amount" (transfer_key).
    transfer: str = ""


def transfer_key(sender: str, recipient: str, amount: int) -> str:
    """How a SubmitReply names the transfer its id was applied with."""
    return f"{sender}>{recipient}:{amount}"


class BalanceReply(ClientReply):
    type: Literal["balance_reply"] = "balance_reply"
    account: str
    balance: int
    exists: bool
    applied_index: int


class StatusReply(ClientReply):
    type: Literal["status_reply"] = "status_reply"
    node_id: int
    role: str
    term: int
    leader_id: int | None
    commit_index: int
    last_applied: int
    last_log_index: int
    chain_height: int
    head_hash: str


class ChainReply(ClientReply):
    type: Literal["chain_reply"] = "chain_reply"
    # Canonical block documents (see chain.Block.to_doc); at most chain.MAX_BLOCKS_PER_REPLY.
    blocks: list[dict]
    height: int  # the node's chain height when it answered


class SubmitResults(ClientReply):
    """The answers to transfers of one SubmitBatchRequest that were applied in one block.

    A batch is answered block by block, compactly: one row per transfer, with the block's height
    and hash once. A transfer applied before (a retry) is answered with the block it is in.
    """

    type: Literal["submit_results"] = "submit_results"
    height: int
    block_hash: str
    # (tx_id, status, reason, transfer): transfer names what the id was applied with (transfer_key).
    results: list[tuple[str, Literal["committed", "rejected"], str | None, str]]


class RedirectReply(ClientReply):
    """This node is not the leader; ``leader_id`` is the leader it knows of, if any."""

    type: Literal["redirect"] = "redirect"
    leader_id: int | None


class ErrorReply(ClientReply):
    type: Literal["error"] = "error"
    error: str


class BatchReply(_Msg):
    """The answers to ``SubmitBatchRequest``s that were ready together, in no particular order."""

    type: Literal["batch_reply"] = "batch_reply"
    replies: list[Annotated[Union[SubmitResults, RedirectReply, ErrorReply], Field(discriminator="type")]]


Message = Annotated[
    Union[
        RequestVoteMessage,
        RequestVoteResponse,
        AppendEntriesMessage,
        AppendEntriesResponse,
        SubmitRequest,
        BalanceRequest,
        StatusRequest,
        ChainRequest,
        SubmitBatchRequest,
        SubmitReply,
        SubmitResults,
        BalanceReply,
        StatusReply,
        ChainReply,
        RedirectReply,
        ErrorReply,
        BatchReply,
    ],
    Field(discriminator="type"),
]
_adapter: TypeAdapter[Message] = TypeAdapter(Message)


_FLAT = {SubmitReply, SubmitResults, BalanceReply, StatusReply, RedirectReply, ErrorReply, RequestVoteMessage,
         RequestVoteResponse, AppendEntriesResponse}


class DecodeError(ValueError):
    """A frame that is not a valid message; the text is a one-line reason. ``req_id`` is the
    frame's own, when it had a usable one, so the error can be matched to the request."""

    def __init__(self, reason: str, req_id: str = "") -> None:
        super().__init__(reason)
        self.req_id = req_id


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped.

    Validation messages echo input (a type tag, a key); without this a frame could put line
    breaks into a "one-line" reason, and so into the logs.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_set = object.__setattr__
_M = TypeVar("_M", bound=BaseModel)


def trusted(cls: type[_M], fields: dict[str, Any]) -> _M:
    """An instance of ``cls`` from values already known to be valid, with every field given.

    What ``model_construct`` does, a third of its cost, without its per-field default handling:
    a leader builds one reply per transfer.
    """
    m = cls.__new__(cls)
    _set(m, "__dict__", fields)
    _set(m, "__pydantic_fields_set__", set(fields))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


# NAME_PATTERN, checked directly (fullmatch: ``$`` alone would allow a trailing newline).
NAME_FULLMATCH = re.compile(NAME_PATTERN).fullmatch


def encode(msg: BaseModel) -> bytes:
    if type(msg) in _FLAT:
        # Every field is a plain value, so the instance dict is the wire map (much cheaper than
        # model_dump on the reply path, which runs once per transfer).
        return msgpack.packb(msg.__dict__, use_bin_type=True)
    return msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)


def encode_batch_reply(replies: list[ClientReply]) -> bytes:
    """A ``BatchReply`` frame of ``replies`` (every reply type it holds is flat)."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": "batch_reply", "replies": [r.__dict__ for r in replies]},
                         use_bin_type=True)


# The most items (array elements, map keys) a frame may hold in one array or map, checked
# while unpacking: a map of 500,000 unknown keys under the size limit took pydantic 2 s to
# refuse (one error each), long enough for the followers to elect another leader.
MAX_REQUEST_ITEMS = 4096  # what a node takes: at most 2048 rows a batch, 64 entries an append
MAX_REPLY_ITEMS = 32768  # what a client takes: up to 20,000 answers in one BatchReply
MAX_MAP_KEYS = 64


def decode(frame: bytes, max_items: int = MAX_REQUEST_ITEMS) -> Message:
    if len(frame) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(frame)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_array_len=max_items,
                              max_map_len=MAX_MAP_KEYS)
    except ValueError as exc:
        if "exceeds max_" in str(exc):
            raise DecodeError(f"a list or map in the frame is too long (at most {max_items} items, "
                              f"{MAX_MAP_KEYS} keys)") from None
        raise DecodeError(f"not a msgpack frame: {type(exc).__name__}") from None
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"not a msgpack frame: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"frame is a {type(raw).__name__}, not a map")
    req_id = raw.get("req_id")
    req_id = req_id if type(req_id) is str and len(req_id) <= 64 else ""
    v = raw.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:  # True == 1 == 1.0: check the type as well
        raise DecodeError(f"unsupported protocol version {v!r}", req_id)
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise DecodeError(one_line(f"invalid message: {where}: {first['msg']}"), req_id) from None
