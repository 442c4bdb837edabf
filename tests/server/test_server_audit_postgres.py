"""The audit trail of several replicas: two TorchServe instances write to one PostgreSQL
database (a temporary Debian cluster, tests/pg_server.py), under mixed traffic, one of
their workers SIGKILLed midway. Every record whose answer was sent is there, each
worker's chain verifies, and the records of both instances are found."""
import json

import pytest

from audit_traffic import Target, audit_cli, exported, soak, worker_pids
from harness import build_text_mar

pytestmark = pytest.mark.server
TEXTS = ["the soup was great", "the staff were rude but kind", "a dull and long evening", "never again, honestly",
         "the chef is from naples and it shows"]


@pytest.fixture(scope="module")
def replicas(postgres_server, tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("audit_pg")
    sink = postgres_server.create_database("replicas_trail")
    # the MAR says what to record; each replica gets the sink from its environment, as in a deployment
    build_text_mar(tmp, "notes", config={"batchSize": 4, "maxBatchDelay": 20,
                                         "explain": {"n_steps": 8, "audit": {"record": "all"}}})
    servers = [TorchServe(tmp / "store", {"notes": "notes.mar"}, tmp / f"ts{k}", env={"TSEXPLAIN_AUDIT_SINK": sink})
               for k in range(2)]
    started = []
    try:
        for server in servers:
            started.append(server.start(timeout=600))
        yield servers, sink
    finally:
        for server in started:
            server.stop()


def text_body(rng):
    return rng.choice(TEXTS).encode(), {"Content-Type": "text/plain"}


def test_two_instances_one_database_a_worker_killed(replicas):
    servers, sink = replicas
    first_pids = [worker_pids(server, "notes")[0] for server in servers]
    result = soak([Target(server, "notes", text_body, text_body) for server in servers], threads=4, kill=0,
                  kill_after_s=8, after_restart_s=6)
    assert result.new_pid is not None, "TorchServe did not restart the killed worker"
    records = exported(sink)
    received = set(result.ids())
    assert received and received <= set(records), f"{len(received - set(records))} answered records missing"
    pid_of = {record_id: int(records[record_id]["writer"].split(":")[1]) for record_id in records}
    # both instances' records, and on the first the killed worker's and its successor's
    assert {pid_of[i] for i in result.ids(target=1)} == {first_pids[1]}
    assert {pid_of[i] for i in result.ids(target=0)} == {result.killed_pid, result.new_pid}
    assert result.killed_pid == first_pids[0]

    verified = audit_cli("--db", sink, "verify")
    assert verified.returncode == 0, verified.stdout
    assert f"in {len({r['writer'] for r in records.values()})} chain(s)" in verified.stdout
    listed = audit_cli("--db", sink, "list", "--model", "notes", "--limit", "100000")
    assert {line.split()[1] for line in listed.stdout.splitlines()} == set(records)
    writers = [json.loads(line) for line in audit_cli("--db", sink, "writers").stdout.splitlines()]
    assert {w["pid"] for w in writers} == {first_pids[0], first_pids[1], result.new_pid}
