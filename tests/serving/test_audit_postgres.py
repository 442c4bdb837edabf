"""The PostgreSQL sink, on a real server started for the session (tests/pg_server.py)."""
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit_entries import image_entry, text_entry
from tsexplain.serving.audit import AuditSettings, AuditTrail, AuditUnavailable, Filters, open_store
from tsexplain.tools import audit as cli

WRITER = str(Path(__file__).parents[1] / "audit_entries.py")


def trail_on(url, **kw):
    return AuditTrail.open(AuditSettings(record="all", sink=url, **kw), model_name="reviews",
                           model_version="2.0", mar_sha256="cd" * 32)


def test_records_verify_and_tampering_is_named(postgres_url):
    import psycopg

    trail = trail_on(postgres_url, keep_input=True)
    ids = trail.record([text_entry(0), image_entry(1, data=b"\x00\x01png")]) + trail.record([text_entry(2)])
    store = open_store(postgres_url)
    assert store.get(ids[1]).input == b"\x00\x01png"
    assert json.loads(store.get(ids[0]).body)["explanation"]["convergence_delta"]["relative"] == "NaN"
    report, heads = store.verify()
    assert report.ok and report.records == 3 and heads[0].seq == 2
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("UPDATE audit_records SET body = replace(body, 'positive', 'negative') WHERE id = %s", (ids[2],))
    (broken,) = store.verify()[0].breaks
    assert (broken.seq, broken.id) == (2, ids[2]) and "hash does not match" in broken.reason
    store.close()
    trail.close()


def test_two_writer_processes_on_one_database(postgres_url):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    start_at = time.time() + 4  # both open the trail, then start together
    processes = [subprocess.Popen([sys.executable, WRITER, postgres_url, "--batches", "60", "--model", f"m{i}",
                                   "--start-at", str(start_at)],
                                  stdout=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    store = open_store(postgres_url)
    report, heads = store.verify()
    assert report.ok and report.chains == 2 and report.records == 480
    spans = []
    for i, output in enumerate(outputs):
        ids = [line[3:] for line in output.splitlines() if line.startswith("id ")]
        chain = list(store.records(Filters(model=f"m{i}")))
        assert [r.id for r in chain] == ids and [r.seq for r in chain] == list(range(240))
        spans.append((chain[0].time, chain[-1].time))
    assert max(s[0] for s in spans) < min(s[1] for s in spans), "the writers did not run at the same time"
    store.close()


def test_failure_policy_and_reconnection(postgres_url, caplog):
    import psycopg

    trail = trail_on(postgres_url, timeout_ms=200)
    serving = trail_on(postgres_url, timeout_ms=200, on_failure="serve")
    first = trail.record([image_entry(0)])
    with psycopg.connect(postgres_url) as blocker:  # holds the table until the block ends
        blocker.execute("LOCK TABLE audit_records IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.ERROR):
            with pytest.raises(AuditUnavailable):
                trail.record([image_entry(1)])
            assert serving.record([image_entry(1), image_entry(2)]) == [None, None]
    assert "audit write failed: count=1" in caplog.text and "audit records lost: count=2" in caplog.text
    assert serving.lost_records == 2 and serving.record([image_entry(3)])[0] is not None
    second = trail.record([image_entry(2)])  # a new connection, the head read back
    store = open_store(postgres_url)
    assert store.verify()[0].ok and [store.get(i).seq for i in first + second] == [0, 1]
    store.close()


def test_prune_and_the_command_line(postgres_url, tmp_path):
    trail = trail_on(postgres_url)
    old = trail.record([image_entry(k) for k in range(5)])
    new = trail.record([image_entry(5, caller="team-b")])
    out = io.StringIO()
    assert cli.main(["--db", postgres_url, "list", "--caller", "team-b"], out=out) == 0
    assert new[0] in out.getvalue() and old[0] not in out.getvalue()
    out = io.StringIO()
    assert cli.main(["--db", postgres_url, "show", old[2]], out=out) == 0
    assert json.loads(out.getvalue())["id"] == old[2]
    store = open_store(postgres_url)
    cutoff = store.get(new[0]).time
    assert cli.main(["--db", postgres_url, "prune", "--before", cutoff, "--dry-run"], out=io.StringIO()) == 0
    assert store.get(old[0]) is not None
    out = io.StringIO()
    assert cli.main(["--db", postgres_url, "prune", "--before", cutoff], out=out) == 0
    assert "pruned 5 record(s) of 1 chain(s)" in out.getvalue() and store.get(old[0]) is None
    out = io.StringIO()
    assert cli.main(["--db", postgres_url, "verify"], out=out) == 0 and "1 record(s) in 1 chain(s): OK" in out.getvalue()
    trail.record([image_entry(6)])
    assert store.verify()[0].ok
    store.close()


def test_a_least_privilege_worker_role(postgres_url):
    """The set-up docs/audit.md gives: the owner creates the tables, the workers' role may
    insert records and move its head, and can neither edit nor delete records."""
    import psycopg

    open_store(postgres_url).close()  # as the owner
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("DROP ROLE IF EXISTS tsexplain_worker")
        db.execute("CREATE ROLE tsexplain_worker LOGIN")
        db.execute("GRANT SELECT, INSERT ON audit_records, audit_writers TO tsexplain_worker")
        db.execute("GRANT UPDATE (head_seq, head_hash, closed_at) ON audit_writers TO tsexplain_worker")
        db.execute("GRANT SELECT ON audit_anchors, audit_meta TO tsexplain_worker")
    worker_url = postgres_url.replace("postgres@", "tsexplain_worker@")
    trail = trail_on(worker_url)
    (record_id,) = trail.record([image_entry(0)])
    trail.close()
    with psycopg.connect(worker_url, autocommit=True) as db:
        for statement in ("UPDATE audit_records SET caller = 'x'", "DELETE FROM audit_records",
                          "UPDATE audit_writers SET model = 'x'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                db.execute(statement)
    store = open_store(postgres_url)
    assert store.verify()[0].ok and store.get(record_id) is not None
    store.close()
