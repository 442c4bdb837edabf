"""Tamper evidence: one hash chain per writer, and the checks that ``verify`` runs.

A *writer* is one worker process with the trail open (its id: host, pid, start
time and a random suffix). Its records carry ``seq`` 0, 1, 2, ... and

    hash = SHA-256( prev_hash (64 hex digits, ASCII) + "\\n" + body (canonical JSON, UTF-8) )

where ``prev_hash`` is the hash of the writer's previous record (``GENESIS``, 64
zeros, before seq 0). The body holds ``writer`` and ``seq`` itself, so a record
cannot be moved to another place or chain without its hash changing. The writer's
row in ``audit_writers`` holds its *head* (last seq and hash), updated in the same
transaction as the records, so removing records at the end of a chain shows too.

A legitimate prune removes the oldest records of a chain and leaves an *anchor*
(``audit_anchors``: the seq of the first kept record and the hash it links to),
from which the chain verifies again.

``verify`` walks every chain in seq order and reports, for each chain, the first
broken link (writer, seq, id, reason): an edited record (its hash no longer
matches its body, or a finding column no longer matches the body), a removed or
reordered one (a seq gap, or a ``prev_hash`` that is not its predecessor's hash),
records removed at the start (the chain starts neither at seq 0 from GENESIS nor
at its anchor) or at the end (the chain stops before its writer's head), a kept
input whose bytes no longer match its SHA-256.

What it cannot detect, on its own: someone with write access who rewrites a chain
consistently (recomputes the hashes and the head, or forges an anchor), since no
secret enters the hash. Heads kept outside close that gap: save them
(``tsexplain-audit verify --save-heads``, ``heads_document``) somewhere the
database's writers cannot change (a WORM bucket, a signed ticket), and a later
``verify --check-heads`` (``check_heads``) finds any record at or before a saved
head that was changed or removed other than by a prune.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

from .record import INDEXED_COLUMNS, body_field

GENESIS = "0" * 64


def link_hash(prev_hash: str, body: str) -> str:
    """The hash of a record whose predecessor's hash is ``prev_hash``."""
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StoredRecord:
    """A row of ``audit_records``: the finding columns, the body, the links, the kept input."""

    id: str
    writer: str
    seq: int
    time: str
    model: str
    method: str
    caller: Optional[str]
    input_sha256: str
    body: str
    prev_hash: str
    hash: str
    input: Optional[bytes] = None


@dataclass(frozen=True)
class Head:
    """A writer's last committed record (``seq`` -1 and ``GENESIS`` before its first)."""

    writer: str
    seq: int
    hash: str


@dataclass(frozen=True)
class Anchor:
    """Where a pruned chain starts again: the first kept seq and the hash it links to."""

    writer: str
    seq: int
    prev_hash: str
    cutoff: str = ""
    pruned_at: str = ""
    pruned: int = 0


@dataclass(frozen=True)
class Break:
    """The first broken link of a chain."""

    writer: str
    seq: Optional[int]
    id: Optional[str]
    reason: str

    def __str__(self) -> str:
        return f"writer={self.writer} seq={self.seq} id={self.id}: {self.reason}"


@dataclass
class Report:
    records: int = 0
    chains: int = 0
    breaks: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks


def chain_start(writer: str, anchors: Mapping[str, Anchor]) -> tuple[int, str]:
    """(first seq, the hash it links to) of a chain, pruned or not."""
    anchor = anchors.get(writer)
    return (anchor.seq, anchor.prev_hash) if anchor else (0, GENESIS)


def check_record(record: StoredRecord, seq: int, prev_hash: str) -> Optional[str]:
    """Why ``record`` is not a valid link at ``seq`` after ``prev_hash`` (``None``: it is)."""
    try:
        body = json.loads(record.body)
    except ValueError:
        return "its body is not JSON (the record was edited)"
    if not isinstance(body, dict):
        return "its body is not a JSON object (the record was edited)"
    if link_hash(record.prev_hash, record.body) != record.hash:
        return "its hash does not match its content (the record was edited)"
    for column, path in INDEXED_COLUMNS.items():
        if getattr(record, column) != body_field(body, path):
            return f"its column {column!r} differs from its body (the row was edited)"
    if record.seq != seq:
        if record.seq > seq:
            return f"records seq {seq}..{record.seq - 1} before it are missing (removed)"
        return f"expected seq {seq} here (rows were reordered)"
    if record.prev_hash != prev_hash:
        return (f"its prev_hash is not the hash of the record before it (seq {seq - 1} was changed, "
                "removed or reordered)" if seq > 0 or prev_hash != GENESIS else
                "the first record of the chain does not link to GENESIS")
    kept = body_field(body, ("input", "kept"))
    if record.input is not None or kept:
        if record.input is None:
            return "its kept input is missing"
        if not kept or hashlib.sha256(record.input).hexdigest() != record.input_sha256:
            return "its kept input does not match the input SHA-256 in its body (the input was replaced)"
    return None


def verify(records: Iterable[StoredRecord], heads: Mapping[str, Head], anchors: Mapping[str, Anchor],
           progress: Optional[Callable[[int], None]] = None) -> Report:
    """Check every chain. ``records`` must come ordered by (writer, seq)."""
    report = Report()
    seen = set()
    for writer, chain in itertools.groupby(records, key=lambda r: r.writer):
        seen.add(writer)
        report.chains += 1
        seq, prev = chain_start(writer, anchors)
        last: Optional[StoredRecord] = None
        broken = False
        for record in chain:
            report.records += 1
            if progress is not None:
                progress(report.records)
            if broken:
                continue
            reason = check_record(record, seq, prev)
            if reason is not None:
                if last is None and record.seq > seq and reason.startswith("records seq"):
                    reason = (f"the chain starts at seq {record.seq}, not at seq {seq}"
                              f"{' (its prune anchor)' if writer in anchors else ''}: records at the start were removed")
                report.breaks.append(Break(writer, record.seq, record.id, reason))
                broken = True
                continue
            seq, prev, last = record.seq + 1, record.hash, record
        if broken:
            continue
        head = heads.get(writer)
        if head is None:
            report.breaks.append(Break(writer, last.seq, last.id, "its writer is not registered in audit_writers"))
        elif (head.seq, head.hash) != (last.seq, last.hash):
            if head.seq > last.seq:
                reason = (f"the chain ends at seq {last.seq} but its writer's head is seq {head.seq} "
                          "(records at the end were removed)")
            else:
                reason = f"its writer's head (seq {head.seq}) does not match the chain's last record"
            report.breaks.append(Break(writer, last.seq, last.id, reason))
    for writer, head in heads.items():
        if writer in seen:
            continue
        seq, prev = chain_start(writer, anchors)
        if (head.seq, head.hash) != (seq - 1, prev):
            report.breaks.append(Break(writer, head.seq, None,
                                       f"its writer's head is seq {head.seq} but the chain has no records (removed)"))
    return report


def heads_document(heads: Iterable[Head]) -> list[dict]:
    """The heads as saved by ``verify --save-heads``."""
    return [{"writer": h.writer, "seq": h.seq, "hash": h.hash} for h in sorted(heads, key=lambda h: h.writer)]


def check_heads(saved: Iterable[Mapping], anchors: Mapping[str, Anchor],
                lookup: Callable[[str, int], Optional[StoredRecord]]) -> list[Break]:
    """Breaks against heads saved earlier: each saved head's record must still be there
    with the same hash, unless a prune removed it (then the anchor must agree)."""
    breaks = []
    for head in saved:
        writer, seq, digest = head["writer"], int(head["seq"]), head["hash"]
        if seq < 0:
            continue
        record = lookup(writer, seq)
        if record is not None:
            if record.hash != digest:
                breaks.append(Break(writer, seq, record.id, "differs from the head saved earlier (the chain was rewritten)"))
            continue
        anchor = anchors.get(writer)
        if anchor is None or anchor.seq <= seq:
            breaks.append(Break(writer, seq, None, "the head saved earlier is missing (records at the end were removed)"))
        elif anchor.seq == seq + 1 and anchor.prev_hash != digest:
            breaks.append(Break(writer, seq, None, "the prune anchor does not link to the head saved earlier"))
    return breaks
