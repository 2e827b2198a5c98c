"""Client library and command line: ``python -m ledger.client`` (installed as ``ledger``).

The client finds the leader itself, follows redirects, retries on timeout with the same
transfer id (so a retry never pays twice) and gives up after a deadline.
Exit codes: 0 ok, 1 rejected or verification failed, 2 usage or config error,
3 cluster unavailable.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import zmq
from pydantic import BaseModel

from ledger.chain import Block, ChainError, verify_block
from ledger.config import ClusterConfig, ConfigError, load_config
from ledger.messages import (
    MAX_BATCH_TRANSFERS,
    MAX_COUNTER,
    MAX_REPLY_ITEMS,
    NAME_PATTERN,
    BatchReply,
    BalanceReply,
    BalanceRequest,
    ChainReply,
    ChainRequest,
    ClientRequest,
    DecodeError,
    ErrorReply,
    RedirectReply,
    StatusReply,
    StatusRequest,
    SubmitBatchRequest,
    SubmitReply,
    SubmitRequest,
    SubmitResults,
    Transfer,
    decode,
    encode,
    transfer_key,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class ClusterUnavailable(Exception):
    """No node answered usefully before the deadline."""


@dataclass
class NodeChain:
    node_id: int
    blocks: list[Block] = field(default_factory=list)
    error: str | None = None


@dataclass
class VerifyReport:
    chains: list[NodeChain]
    unreachable: list[int]
    agreed_height: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.chains)


class LedgerClient:
    def __init__(self, cfg: ClusterConfig, *, request_timeout: float = 0.5, deadline: float = 15.0) -> None:
        self.cfg = cfg
        self.request_timeout = request_timeout
        self.deadline = deadline
        self.ctx = zmq.Context()
        self.sockets: dict[int, zmq.Socket] = {}
        self.leader_hint: int | None = None
        self._order = sorted(cfg.nodes)
        self._next = 0
        self._suspect: dict[int, float] = {}  # node -> until when it is presumed down

    def close(self) -> None:
        for s in self.sockets.values():
            s.close(0)
        self.ctx.term()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one request to one node ------------------------------------------------------------------

    def _socket(self, node_id: int) -> zmq.Socket:
        s = self.sockets.get(node_id)
        if s is None:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self.cfg.nodes[node_id])
            self.sockets[node_id] = s
        return s

    def request(self, node_id: int, msg: ClientRequest, timeout: float | None = None) -> BaseModel | None:
        """Send ``msg`` to one node; its reply, or None on timeout."""
        s = self._socket(node_id)
        s.send(encode(msg))
        end = time.monotonic() + (self.request_timeout if timeout is None else timeout)
        while (left := end - time.monotonic()) > 0:
            if not s.poll(int(left * 1000) + 1):
                break
            try:
                reply = decode(s.recv(), MAX_REPLY_ITEMS)
            except DecodeError:
                continue
            if getattr(reply, "req_id", None) in (msg.req_id, ""):
                return reply
            # a late answer to an earlier, timed-out request: skip it
        # The node may be down: drop the socket so queued requests are not delivered stale later.
        s.close(0)
        del self.sockets[node_id]
        return None

    # ---- leader-routed calls ------------------------------------------------------------------

    def _is_suspect(self, node: int) -> bool:
        return self._suspect.get(node, 0.0) > time.monotonic()

    def _pick(self) -> int:
        if self.leader_hint is not None and not self._is_suspect(self.leader_hint):
            return self.leader_hint
        candidates = [n for n in self._order if not self._is_suspect(n)] or self._order
        node = candidates[self._next % len(candidates)]
        self._next += 1
        return node

    def _leader_call(self, attempt: Callable[[int, float], BaseModel | None]) -> BaseModel:
        """Run ``attempt(node, timeout)`` against the leader until it gives an answer.

        ``attempt`` returns the node's reply, or None if it did not answer in time; redirects
        are followed, and "retry" errors and elections waited out, until the deadline.
        """
        end = time.monotonic() + self.deadline
        backoff = 0.02
        last = "no node answered"
        silent: set[int] = set()
        while time.monotonic() < end:
            node = self._pick()
            reply = attempt(node, min(self.request_timeout, max(0.05, end - time.monotonic())))
            if reply is None:
                silent.add(node)
                last = f"no answer from node{'s' if len(silent) > 1 else ''} {', '.join(map(str, sorted(silent)))}"
                self.leader_hint = None
                # Presume it down for a while: followers may still name it leader until they notice.
                self._suspect[node] = time.monotonic() + 1.0
                continue
            self._suspect.pop(node, None)
            if isinstance(reply, RedirectReply):
                if (reply.leader_id is not None and reply.leader_id != node
                        and reply.leader_id in self.cfg.nodes and not self._is_suspect(reply.leader_id)):
                    self.leader_hint = reply.leader_id
                    continue
                last = "no leader elected yet"
                self.leader_hint = None
            elif isinstance(reply, ErrorReply) and "retry" in reply.error:
                last = reply.error
            else:
                self.leader_hint = node
                return reply
            time.sleep(backoff)  # election in progress: back off briefly before asking again
            backoff = min(backoff * 2, 0.3)
        raise ClusterUnavailable(f"cluster unavailable after {self.deadline:g}s: {last}")

    def submit(self, sender: str, recipient: str, amount: int, tx_id: str | None = None) -> SubmitReply:
        t = Transfer(tx_id=tx_id or uuid.uuid4().hex, sender=sender, recipient=recipient, amount=amount)
        reply = self._leader_call(
            lambda node, timeout: self.request(node, SubmitRequest(req_id=uuid.uuid4().hex, transfer=t), timeout))
        if isinstance(reply, ErrorReply):
            raise ValueError(reply.error)
        assert isinstance(reply, SubmitReply)
        return _checked(reply, t)

    def submit_batch(self, transfers: Sequence[Transfer]) -> list[SubmitReply]:
        """Submit many transfers in SubmitBatchRequests; their answers, in the same order.

        As ``submit``: the leader is found, redirects followed, and what is still unanswered
        after a timeout is sent again with the same transfer ids, so nothing is paid twice.
        """
        ids = [t.tx_id for t in transfers]
        if len(set(ids)) != len(ids):
            raise ValueError("the transfers of one batch need distinct ids")
        answers: dict[str, SubmitReply] = {}

        def attempt(node: int, timeout: float) -> BaseModel | None:
            todo = [t for t in transfers if t.tx_id not in answers]
            reply: BaseModel | None = None
            for k in range(0, len(todo), MAX_BATCH_TRANSFERS):
                reply = self._submit_round(node, todo[k : k + MAX_BATCH_TRANSFERS], answers, timeout)
                if not isinstance(reply, SubmitReply):
                    return reply  # no answer, a redirect or an error: the caller decides
            return reply

        if transfers:
            reply = self._leader_call(attempt)
            if isinstance(reply, ErrorReply):
                raise ValueError(reply.error)
        return [_checked(answers[t.tx_id], t) for t in transfers]

    def _submit_round(self, node: int, todo: list[Transfer], answers: dict[str, SubmitReply],
                      timeout: float) -> BaseModel | None:
        """Send ``todo`` to ``node`` in one batch and gather its answers into ``answers``.

        Returns the last SubmitReply once all are answered, a redirect or error for the batch,
        or None when the node went quiet for ``timeout`` seconds before answering all.
        """
        req = SubmitBatchRequest(req_id=uuid.uuid4().hex, transfers=[t.row() for t in todo])
        want = {t.tx_id for t in todo}
        s = self._socket(node)
        s.send(encode(req))
        last: BaseModel | None = None
        while want:
            if not s.poll(int(timeout * 1000) + 1):
                s.close(0)  # as in request(): nothing stale is delivered later
                del self.sockets[node]
                return None
            try:
                frame = decode(s.recv(), MAX_REPLY_ITEMS)
            except DecodeError:
                continue
            if isinstance(frame, ErrorReply) and frame.req_id == "":
                return frame  # the node could not read the request at all
            for r in frame.replies if isinstance(frame, BatchReply) else ():
                if r.req_id != req.req_id:
                    continue  # an answer to an earlier batch
                if not isinstance(r, SubmitResults):
                    return r
                for tx_id, status, reason, transfer in r.results:
                    if tx_id in want:
                        want.discard(tx_id)
                        answers[tx_id] = last = SubmitReply(req_id=r.req_id, tx_id=tx_id, status=status, reason=reason,
                                                            height=r.height, block_hash=r.block_hash, transfer=transfer)
        return last

    def balance(self, account: str) -> BalanceReply:
        reply = self._leader_call(
            lambda node, timeout: self.request(node, BalanceRequest(req_id=uuid.uuid4().hex, account=account), timeout))
        if isinstance(reply, ErrorReply):
            raise ValueError(reply.error)
        assert isinstance(reply, BalanceReply)
        return reply

    # ---- per-node calls ------------------------------------------------------------------------

    def status(self) -> dict[int, StatusReply | None]:
        """Every node's status, asked of all at once; None for a node that did not answer
        within the request timeout (or the deadline, if shorter)."""
        req_ids = {node: uuid.uuid4().hex for node in self._order}
        poller = zmq.Poller()
        for node in self._order:
            s = self._socket(node)
            s.send(encode(StatusRequest(req_id=req_ids[node])))
            poller.register(s, zmq.POLLIN)
        out: dict[int, StatusReply | None] = dict.fromkeys(self._order)
        end = time.monotonic() + min(self.request_timeout, self.deadline)
        by_socket = {self.sockets[n]: n for n in self._order}
        while any(v is None for v in out.values()) and (left := end - time.monotonic()) > 0:
            for s, _ in poller.poll(int(left * 1000) + 1):
                try:
                    reply = decode(s.recv(), MAX_REPLY_ITEMS)
                except DecodeError:
                    continue
                node = by_socket[s]
                if isinstance(reply, StatusReply) and reply.req_id == req_ids[node]:
                    out[node] = reply
        for node, reply in out.items():
            if reply is None:  # as in request(): nothing stale is delivered later
                self.sockets.pop(node).close(0)
        return out

    def chain(self, node_id: int, start: int = 0, end: int | None = None) -> Iterator[Block]:
        """Blocks start..end (inclusive; end None = head) of one node, fetched page by page."""
        h = start
        while end is None or h <= end:
            # A page of big blocks takes a while to read and send, but never beyond --timeout.
            reply = self.request(node_id, ChainRequest(req_id=uuid.uuid4().hex, start=h, end=end),
                                 timeout=min(self.deadline, max(self.request_timeout, 5.0)))
            if not isinstance(reply, ChainReply):
                raise ClusterUnavailable(f"cluster unavailable: node {node_id} did not answer a chain request")
            if not reply.blocks:
                return
            for doc in reply.blocks:
                yield Block.model_validate(doc)
            h = reply.blocks[-1]["height"] + 1

    def verify(self) -> VerifyReport:
        """Re-check every reachable node's chain and that all agree on their common prefix."""
        chains: list[NodeChain] = []
        unreachable: list[int] = []
        problems: list[str] = []
        for node, st in self.status().items():
            if st is None:
                unreachable.append(node)
                continue
            nc = NodeChain(node)
            prev: Block | None = None
            try:
                for block in self.chain(node):
                    verify_block(block, prev)
                    nc.blocks.append(block)
                    prev = block
            except ChainError as exc:
                nc.error = str(exc)
                problems.append(f"node {node}: {exc}")
            except ClusterUnavailable:
                unreachable.append(node)
                continue
            chains.append(nc)
        agreed = min((len(c.blocks) for c in chains), default=0) - 1
        for h in range(agreed + 1):
            hashes = {c.node_id: c.blocks[h].hash for c in chains}
            if len(set(hashes.values())) > 1:
                problems.append(f"nodes disagree at height {h}: " +
                                ", ".join(f"node {n} {v[:12]}" for n, v in sorted(hashes.items())))
                agreed = h - 1
                break
        if not chains:
            problems.append("no node answered")
        return VerifyReport(chains, unreachable, agreed, problems)


def _checked(reply: SubmitReply, t: Transfer) -> SubmitReply:
    if reply.transfer and reply.transfer != transfer_key(t.sender, t.recipient, t.amount):
        # The id was taken by another transfer (perhaps in the same batch): this one was not applied.
        return reply.model_copy(update={
            "status": "rejected", "reason": f"transfer id {t.tx_id} was already used for {reply.transfer}"})
    return reply


# ---- command line --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, json_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.json_errors = json_errors

    def error(self, message: str) -> NoReturn:
        if self.json_errors:  # --json promises one document, also when the arguments are wrong
            _print_error(EXIT_USAGE, f"error: {message}")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _name(kind: str) -> Any:
    pattern = re.compile(NAME_PATTERN)

    def check(value: str) -> str:
        if not pattern.fullmatch(value):  # not match: its $ also accepts a trailing newline
            shown = value if len(value) <= 70 else value[:64] + "..."
            raise argparse.ArgumentTypeError(
                f"invalid {kind} {shown!r}: use 1-64 letters, digits or _ . : @ -")
        return value

    return check


_WHOLE = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also takes "1_000", " +7 " and "٢٥"


def _amount(value: str) -> int:
    if not _WHOLE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"amount must be a whole number, not {value[:40]!r}")
    amount = int(value)
    if not -(2**63) <= amount < 2**63:
        raise argparse.ArgumentTypeError("amount must fit in 64 bits")
    return amount


def _height(value: str) -> int:
    if not _WHOLE.fullmatch(value) or int(value) < 0 or int(value) > MAX_COUNTER:
        raise argparse.ArgumentTypeError(f"height must be a whole number from 0 to {MAX_COUNTER}, not {value[:40]!r}")
    return int(value)


def build_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML cluster config (default: server_config.py)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON (one document; chain: one block per line)")
    common.add_argument("--timeout", type=float, metavar="S", default=argparse.SUPPRESS,
                        help="give up after S seconds (default 15)")
    p = _Parser(prog="ledger", description="Client of a raftledger cluster.", parents=[common],
                json_errors=json_errors)
    sub = p.add_subparsers(dest="command", required=True,
                           parser_class=functools.partial(_Parser, json_errors=json_errors))
    s = sub.add_parser("submit", parents=[common], help="transfer AMOUNT from SENDER to RECIPIENT")
    s.add_argument("sender", type=_name("sender"))
    s.add_argument("recipient", type=_name("recipient"))
    s.add_argument("amount", type=_amount)
    s.add_argument("--tx-id", type=_name("transaction id"), help="client-chosen id (default: random)")
    b = sub.add_parser("balance", parents=[common], help="an account's balance (linearizable)")
    b.add_argument("account", type=_name("account"))
    sub.add_parser("status", parents=[common], help="every node's role, term and chain head")
    c = sub.add_parser("chain", parents=[common], help="print blocks")
    c.add_argument("--node", type=int, help="node to read from (default: the leader, else any)")
    c.add_argument("--from", dest="start", type=_height, default=0, metavar="H")
    c.add_argument("--to", dest="end", type=_height, default=None, metavar="H")
    sub.add_parser("verify", parents=[common], help="verify every reachable node's chain")
    return p


def _print_error(code: int, message: str) -> None:
    """The one JSON document a failed command prints with --json."""
    _print({"error": message, "exit_code": code})


def _print(doc: Any) -> None:
    print(json.dumps(doc, sort_keys=True))


def run(args: argparse.Namespace, client: LedgerClient) -> int:
    as_json = getattr(args, "json", False)
    if args.command == "submit":
        r = client.submit(args.sender, args.recipient, args.amount, args.tx_id)
        if as_json:
            _print(r.model_dump(exclude={"v", "type", "req_id"}))
        elif r.status == "committed":
            print(f"committed: {r.tx_id}: {args.sender} -> {args.recipient} {args.amount} "
                  f"in block {r.height} ({r.block_hash[:16]})")
        elif r.transfer and r.transfer != transfer_key(args.sender, args.recipient, args.amount):
            print(f"rejected: {r.tx_id}: {r.reason} (in block {r.height}); this transfer was not applied")
        else:
            print(f"rejected: {r.tx_id}: {r.reason} (recorded in block {r.height})")
        return EXIT_OK if r.status == "committed" else EXIT_FAILED
    if args.command == "balance":
        r = client.balance(args.account)
        if as_json:
            _print(r.model_dump(exclude={"v", "type", "req_id"}))
        else:
            print(f"{r.account}: {r.balance}" + ("" if r.exists else " (no such account)"))
        return EXIT_OK
    if args.command == "status":
        st = client.status()
        leaders = [n for n, s in st.items() if s is not None and s.role == "leader"]
        leader = max(leaders, key=lambda n: st[n].term) if leaders else None  # type: ignore[union-attr]
        if not any(st.values()):
            raise ClusterUnavailable("cluster unavailable: no node answered")
        if as_json:
            nodes = []
            for n, s in st.items():
                d: dict[str, Any] = {"id": n, "answered": s is not None}
                if s is not None:
                    d.update(s.model_dump(include={"role", "term", "leader_id", "commit_index", "last_applied",
                                                   "last_log_index", "chain_height", "head_hash"}))
                nodes.append(d)
            _print({"leader": leader, "nodes": nodes})
        else:
            print(f"leader: {leader if leader is not None else 'none'}")
            print(f"{'node':>4}  {'role':<9} {'term':>5} {'commit':>7} {'height':>7}  head")
            for n, s in st.items():
                if s is None:
                    print(f"{n:>4}  {'down':<9}")
                else:
                    print(f"{n:>4}  {s.role:<9} {s.term:>5} {s.commit_index:>7} {s.chain_height:>7}  {s.head_hash[:16]}")
        return EXIT_OK
    if args.command == "chain":
        node = args.node
        if node is None:
            st = client.status()
            up = [n for n, s in st.items() if s is not None]
            if not up:
                raise ClusterUnavailable("cluster unavailable: no node answered")
            node = next((n for n in up if st[n].role == "leader"), up[0])  # type: ignore[union-attr]
        for block in client.chain(node, args.start, args.end):
            if as_json:
                _print(block.to_doc())
            else:
                print(f"#{block.height} index={block.index} term={block.term} txs={len(block.txs)} "
                      f"hash={block.hash[:16]} prev={block.prev_hash[:16]}")
        return EXIT_OK
    if args.command == "verify":
        rep = client.verify()
        if not rep.chains:
            raise ClusterUnavailable("cluster unavailable: no node answered")
        if as_json:
            _print({
                "ok": rep.ok,
                "agreed_height": rep.agreed_height,
                "nodes": [{"id": c.node_id, "height": len(c.blocks) - 1, "head_hash": c.blocks[-1].hash if c.blocks else None,
                           "error": c.error} for c in rep.chains],
                "unreachable": rep.unreachable,
                "problems": rep.problems,
            })
        elif rep.ok:
            heights = ", ".join(f"node {c.node_id} height {len(c.blocks) - 1}" for c in rep.chains)
            print(f"OK: {len(rep.chains)} node(s) verified ({heights}); they agree up to height {rep.agreed_height}")
            if rep.unreachable:
                print(f"not reachable: {', '.join(map(str, rep.unreachable))}")
        else:
            for problem in rep.problems:
                print(f"FAILED: {problem}")
        return EXIT_OK if rep.ok else EXIT_FAILED
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(json_errors="--json" in words).parse_args(words)
    as_json = getattr(args, "json", False)

    def fail(code: int, message: str) -> int:
        """A one-line reason on stderr; with --json, the one JSON document on stdout says it too."""
        if as_json:
            _print_error(code, message)
        print(f"ledger: {message}", file=sys.stderr)
        return code

    timeout = getattr(args, "timeout", 15.0)
    if not 0 < timeout < math.inf:
        return fail(EXIT_USAGE, "error: --timeout must be a positive, finite number of seconds")
    if args.command == "chain" and args.end is not None and args.start > args.end:
        return fail(EXIT_USAGE, f"error: --from {args.start} is above --to {args.end}")
    try:
        cfg = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        return fail(EXIT_USAGE, f"error: {exc}")
    if args.command == "chain" and args.node is not None and args.node not in cfg.nodes:
        return fail(EXIT_USAGE, f"error: node {args.node} is not in the config")
    with LedgerClient(cfg, deadline=timeout) as client:
        try:
            return run(args, client)
        except ClusterUnavailable as exc:
            return fail(EXIT_UNAVAILABLE, str(exc))
        except ValueError as exc:
            return fail(EXIT_FAILED, f"error: {exc}")
        except BrokenPipeError:  # the reader went away (e.g. `ledger chain --json | head -1`)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
