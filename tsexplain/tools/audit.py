"""``tsexplain-audit``: find, show, export, verify and prune the audit trail.

The trail is named by ``--db`` (``sqlite:///var/lib/tsexplain/audit.db``, a plain
file path, or ``postgresql://user@host/db``), else by ``--config`` (a model config
YAML: its ``explain.audit.sink``, with the environment overrides the server
applies, ``--config-model`` naming the model for ``TSEXPLAIN_<MODEL>_AUDIT_SINK``), else by
``TSEXPLAIN_AUDIT_SINK``. Commands::

    list    [filters] [--limit N]        newest first, one line per record
    show    ID [--overlay out.png] [--input-out FILE]
    export  [filters] [--out FILE] [--with-input]   JSON Lines, oldest first
    verify  [--save-heads FILE] [--check-heads FILE]
    prune   --older-than 183d | --before TIME [--dry-run]
    writers                              the writers (worker processes) and their heads
    init                                 create the trail (the only command that creates anything)

Filters: ``--model``, ``--since``, ``--until`` (ISO 8601 date or time, UTC when no
offset is given, or an age such as ``7d``, ``12h``), ``--input-sha256`` or
``--input FILE`` (hashes the file), ``--caller``, ``--method``, ``--writer``.
Long runs print progress on stderr. Exit status: 0 done, 1 a broken chain (verify)
or no such record (show), 2 bad usage or an unreachable sink.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import yaml

from tsexplain.serving.errors import ConfigError
from tsexplain.serving.audit.chain import heads_document
from tsexplain.serving.audit.settings import AuditSettings, sink_kind
from tsexplain.serving.audit.store import Filters, StoreError, format_time, open_store, utc_now

SINK_VARIABLE = "TSEXPLAIN_AUDIT_SINK"
AGE = re.compile(r"(\d+(?:\.\d+)?)([dhm])")
AGE_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


class UsageError(Exception):
    pass


class Progress:
    """A count on stderr every ``EVERY_S`` seconds of a long run (nothing on short ones)."""

    EVERY_S = 2.0

    def __init__(self, label: str, stream=None):
        self.label, self.every_s = label, self.EVERY_S
        self.stream = stream if stream is not None else sys.stderr
        self.started = self.last = time.monotonic()
        self.printed = False

    def __call__(self, count: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last, self.printed = now, True
            rate = count / max(now - self.started, 1e-9)
            print(f"{self.label}: {count} records ({rate:.0f}/s)", file=self.stream, flush=True)

    def done(self, count: int) -> None:
        if self.printed:
            print(f"{self.label}: {count} records, done", file=self.stream, flush=True)


def parse_time(text: str) -> str:
    """A trail time (fixed-width UTC text) from an ISO 8601 date/time or an age like ``7d``."""
    age = AGE.fullmatch(text.strip())
    if age:
        return format_time(utc_now() - timedelta(**{AGE_UNITS[age.group(2)]: float(age.group(1))}))
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"not a time: {text!r} (use 2026-12-01, 2026-12-01T12:00:00+01:00, or an age: 7d, 12h)")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return format_time(moment)


def sink_url(args) -> str:
    if args.db:
        return args.db if ":" in args.db.split("/", 1)[0] else f"sqlite:///{os.path.abspath(args.db)}"
    if args.config:
        section = _explain_section(args.config).get("audit")
        settings = AuditSettings.load(section, args.config_model or "", os.environ)
        if settings.sink is None:
            raise UsageError(f"{args.config}: explain.audit.sink is not set")
        return settings.sink
    if os.environ.get(SINK_VARIABLE):
        return os.environ[SINK_VARIABLE]
    raise UsageError(f"name the trail: --db URL, --config model-config.yaml, or {SINK_VARIABLE}")


def _load_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read it ({exc})")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a model config (a YAML mapping)")
    return data


def _explain_section(path: str) -> dict:
    explain = _load_yaml(path).get("explain") or {}
    if not isinstance(explain, dict):
        raise UsageError(f"{path}: explain is not a mapping")
    return explain


def filters(args) -> Filters:
    digest = args.input_sha256
    if args.input:
        try:
            digest = hashlib.sha256(Path(args.input).read_bytes()).hexdigest()
        except OSError as exc:
            raise UsageError(f"{args.input}: cannot read it ({exc.strerror})")
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest.lower()):
        raise UsageError("--input-sha256 must be 64 hex digits")
    return Filters(model=args.model_name, since=parse_time(args.since) if args.since else None,
                   until=parse_time(args.until) if args.until else None,
                   input_sha256=digest.lower() if digest else None, caller=args.caller, method=args.method,
                   writer=args.writer)


def full_record(record, with_input: bool = False) -> dict:
    """A stored record as the command line prints it: the body, its links, and the input when asked."""
    out = json.loads(record.body)
    out["chain"] = {"prev_hash": record.prev_hash, "hash": record.hash}
    if with_input and record.input is not None:
        out["input"]["base64"] = base64.b64encode(record.input).decode("ascii")
    return out


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("label", value.get("index", "")))
    return "" if value is None else str(value)


def cmd_list(store, args, out) -> int:
    count = 0
    for record in store.records(filters(args), newest_first=True, limit=args.limit):
        body = json.loads(record.body)
        if args.json:
            print(json.dumps(full_record(record), ensure_ascii=False), file=out)
        else:
            contrast = f" vs {_label(body.get('contrast'))}" if body.get("contrast") else ""
            print(f"{record.time}  {record.id}  {record.model}  {record.method}  "
                  f"{_label(body.get('target'))}{contrast}  status={body.get('status')}  "
                  f"caller={record.caller or '-'}  input={record.input_sha256[:12]}", file=out)
        count += 1
    print(f"{count} record(s)", file=sys.stderr)
    return 0


def cmd_show(store, args, out) -> int:
    record = store.get(args.id)
    if record is None:
        print(f"no record with id {args.id}", file=sys.stderr)
        return 1
    print(json.dumps(full_record(record), ensure_ascii=False, indent=2), file=out)
    if args.input_out:
        if record.input is None:
            raise UsageError("the input of this record was not kept (explain.audit.keep_input was off or it was too large)")
        Path(args.input_out).write_bytes(record.input)
        print(f"input saved to {args.input_out}", file=sys.stderr)
    if args.overlay:
        size = render_overlay(record, args)
        print(f"overlay saved to {args.overlay} ({size[0]}x{size[1]})", file=sys.stderr)
    return 0


def render_overlay(record, args) -> tuple[int, int]:
    """Draw the record's heatmap over its kept input again, as the handler did.

    The crop geometry comes from the record's ``parameters`` (``resize``, ``crop``), else
    from ``--resize``/``--crop``, else from the ``handler:`` section of ``--config``, else
    the image handler's defaults (256, 224)."""
    body = json.loads(record.body)
    heatmap = (body.get("explanation") or {}).get("heatmap")
    if not heatmap or "values" not in heatmap:
        raise UsageError("this record has no heatmap (not an image explanation, or recorded without one)")
    if record.input is None:
        raise UsageError("the input of this record was not kept (explain.audit.keep_input was off or it was too "
                         "large): the overlay cannot be drawn again")
    import torch  # only here: the other commands need no torch

    from tsexplain.serving.images import Preprocessing, decode_image, render_overlay as draw
    from tsexplain.serving.errors import RequestError

    params = body.get("parameters") or {}
    handler = (_load_yaml(args.config).get("handler") or {}) if args.config else {}

    def pick(name: str, default):
        flag = getattr(args, name)
        if flag is not None:
            return yaml.safe_load(flag)
        if name in params:
            return params[name]
        return handler.get(name, default)

    resize, crop = pick("resize", 256), pick("crop", 224)
    alpha = float(params.get("overlay_alpha", args.alpha if args.alpha is not None else 0.6))
    try:
        image = decode_image(record.input, 1 << 34)
    except RequestError as exc:
        raise UsageError(f"the kept input is not a decodable image ({exc.message})")
    values = torch.tensor(heatmap["values"], dtype=torch.float32).clamp(min=0)  # signed maps: the positive part
    box = Preprocessing(resize, crop).crop_box(*image.size)
    Path(args.overlay).write_bytes(draw(image, values, box, alpha))
    return image.size


def cmd_export(store, args, out) -> int:
    progress = Progress("exported")
    stream = open(args.out, "w", encoding="utf-8") if args.out else out
    count = 0
    try:
        for record in store.records(filters(args)):
            stream.write(json.dumps(full_record(record, args.with_input), ensure_ascii=False) + "\n")
            count += 1
            progress(count)
    finally:
        if args.out:
            stream.close()
    progress.done(count)
    print(f"exported {count} record(s){' to ' + args.out if args.out else ''}", file=sys.stderr)
    return 0


def cmd_verify(store, args, out) -> int:
    saved = None
    if args.check_heads:
        try:
            saved = json.loads(Path(args.check_heads).read_text())["heads"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{args.check_heads}: not a heads file ({exc})")
    progress = Progress("verified")
    report, heads = store.verify(progress, saved)
    progress.done(report.records)
    if args.save_heads:
        document = {"saved_at": format_time(utc_now()), "sink": store.name, "heads": heads_document(heads)}
        Path(args.save_heads).write_text(json.dumps(document, indent=1) + "\n")
        print(f"heads of {len(heads)} writer(s) saved to {args.save_heads}", file=sys.stderr)
    for broken in report.breaks:
        print(f"BROKEN {broken}", file=out)
    state = "OK" if report.ok else f"FAILED: {len(report.breaks)} broken chain(s)"
    checked = f", checked against {len(saved)} saved head(s)" if saved is not None else ""
    print(f"verified {report.records} record(s) in {report.chains} chain(s){checked}: {state}", file=out)
    return 0 if report.ok else 1


def cmd_prune(store, args, out) -> int:
    if bool(args.older_than) == bool(args.before):
        raise UsageError("prune needs --older-than AGE (e.g. 183d) or --before TIME")
    if args.older_than and not AGE.fullmatch(args.older_than):
        raise UsageError("--older-than takes an age such as 183d or 12h")
    cutoff = parse_time(args.older_than or args.before)
    progress = Progress("pruned")
    result = store.prune(cutoff, dry_run=args.dry_run, progress=progress)
    progress.done(result.records)
    verb = "would prune" if args.dry_run else "pruned"
    print(f"{verb} {result.records} record(s) of {result.writers} chain(s) older than {cutoff}", file=out)
    return 0


def cmd_init(store, args, out) -> int:
    print(f"audit trail ready at {store.name}", file=out)
    return 0


def cmd_writers(store, args, out) -> int:
    for writer in store.writers():
        print(json.dumps(writer), file=out)
    return 0


COMMANDS = {"init": cmd_init, "list": cmd_list, "show": cmd_show, "export": cmd_export, "verify": cmd_verify, "prune": cmd_prune,
            "writers": cmd_writers}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsexplain-audit", description="Find, show, export, verify and prune "
                                     "the audit trail of explanations.")
    parser.add_argument("--db", help="sqlite:///path/audit.db, a file path, or postgresql://user@host:port/db")
    parser.add_argument("--config", help="a model config YAML: use its explain.audit.sink (and handler: for --overlay)")
    parser.add_argument("--config-model", help="with --config: the model's name, for its TSEXPLAIN_<MODEL>_AUDIT_* overrides")
    parser.add_argument("--timeout-ms", type=int, default=10_000, help="how long to wait for the sink")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_filters(p):
        p.add_argument("--model", dest="model_name", help="model name")
        p.add_argument("--since", help="from this time (ISO 8601, UTC by default) or age (7d, 12h)")
        p.add_argument("--until", help="before this time or age")
        group = p.add_mutually_exclusive_group()
        group.add_argument("--input-sha256", help="the SHA-256 of the input (hex)")
        group.add_argument("--input", help="a file: records of exactly this input")
        p.add_argument("--caller", help="the name of the explain token")
        p.add_argument("--method", help="the explanation method")
        p.add_argument("--writer", help="one writer (worker process)")

    p = sub.add_parser("list", help="records, newest first")
    add_filters(p)
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true", help="whole records as JSON Lines")
    p = sub.add_parser("show", help="one record, whole")
    p.add_argument("id")
    p.add_argument("--overlay", help="draw the overlay again into this PNG (image records with the input kept)")
    p.add_argument("--input-out", help="save the kept input to this file")
    p.add_argument("--resize", help="preprocessing resize for --overlay when the record does not say (256, [h, w])")
    p.add_argument("--crop", help="preprocessing centre crop for --overlay when the record does not say (224)")
    p.add_argument("--alpha", type=float, help="overlay opacity when the record does not say (0.6)")
    p = sub.add_parser("export", help="records as JSON Lines, oldest first")
    add_filters(p)
    p.add_argument("--out", help="write to this file (default: stdout)")
    p.add_argument("--with-input", action="store_true", help="include kept inputs, base64")
    p = sub.add_parser("verify", help="recompute every chain; name the first broken link of each")
    p.add_argument("--save-heads", help="write the chains' heads to this file, to keep outside the database")
    p.add_argument("--check-heads", help="also check against heads saved earlier")
    p = sub.add_parser("prune", help="remove old records, leaving the chains verifiable")
    p.add_argument("--older-than", help="an age: 183d, 12h")
    p.add_argument("--before", help="a time (ISO 8601)")
    p.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    sub.add_parser("writers", help="the writers (worker processes) and their heads, as JSON Lines")
    sub.add_parser("init", help="create the trail's tables (and the SQLite file, owner-only); the workers "
                   "create them too, unless their role may not")
    return parser


def main(argv: Optional[list[str]] = None, out=None) -> int:
    args = build_parser().parse_args(argv)
    out = out if out is not None else sys.stdout
    store = None
    try:
        url = sink_url(args)
        sink_kind(url)
        store = open_store(url, timeout_ms=args.timeout_ms, create=args.command == "init")
        return COMMANDS[args.command](store, args, out)
    except (UsageError, ConfigError, StoreError) as exc:
        print(f"tsexplain-audit: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # | head
        return 0
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
