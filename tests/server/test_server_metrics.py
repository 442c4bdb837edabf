"""Prometheus metrics through a real TorchServe 0.12 with the repository's metrics settings
(config.properties' metrics_* keys and deploy/metrics.yaml): after known traffic, /metrics holds
one series per model and method whose counts equal what was sent, TorchServe's own series keep
working, and the Grafana dashboard queries only series that were scraped."""
import base64
import json
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml

from harness import build_text_mar, png
from tsexplain.tools.synthetic import shapes

prometheus_parser = pytest.importorskip("prometheus_client.parser", reason="needs the test extra (prometheus-client)")

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
METRICS_YAML = ROOT / "deploy" / "metrics.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "torchserve-explain.json"
TOKEN = "metrics-test-token"
LONG = " ".join(["the staff were rude but the soup was great"] * 6)
EXPLANATION_METRICS = ("ExplanationsServed", "ExplanationsDenied", "ExplanationsFailed", "ExplanationsTimedOut",
                       "ExplanationCacheHits", "ExplanationCacheMisses", "EarlyAnswers", "AuditRecordsWritten",
                       "AuditRecordsLost", "AuditRecordsFailed")


def shipped_metrics_properties() -> dict:
    """The metrics keys of the repository's config.properties, metrics_config resolved
    against the repository root (where ./serve_demo.sh starts TorchServe)."""
    lines = (ROOT / "config.properties").read_text().splitlines()
    props = dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    chosen = {k: props[k] for k in ("metrics_mode", "metrics_config", "model_metrics_auto_detect")}
    chosen["metrics_config"] = str((ROOT / chosen["metrics_config"]).resolve())
    return chosen


class Traffic:
    """Sends requests and keeps, per model, how many went out and their statuses."""

    def __init__(self, server):
        self.server = server
        self.requests: dict[str, int] = {}
        self.statuses: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()

    def send(self, route, model, body: bytes, headers=None) -> int:
        status, raw = self.server.request("POST", f"{self.server.inference_url}/{route}/{model}", body, headers)
        with self.lock:
            self.requests[model] = self.requests.get(model, 0) + 1
            self.statuses.append((route, model, status))
        return status

    def explain_json(self, model, payload, headers=None) -> int:
        return self.send("explanations", model, json.dumps(payload).encode(),
                         {"Content-Type": "application/json", **(headers or {})})


def send_traffic(ts, notes_trail: Path) -> tuple[Traffic, dict]:
    """Known traffic to four models; returns it and the explanation counts it must produce:
    {(metric, model, method): count}. shapes records to a sink that cannot be opened under
    ``on_failure: serve`` (every record lost), notes to ``notes_trail`` under ``fail``."""
    t = Traffic(ts)
    images = [png(s.image) for s in shapes.generate(4, 20261202, 64)]
    a, b = images[0], images[1]
    # shapes: 4 predictions; gradcam on a (miss), a again (hit), b (miss); gradcam++ on a (miss: the key holds the method)
    assert [t.send("predictions", "shapes", img) for img in images] == [200] * 4
    assert t.send("explanations", "shapes", a) == 200
    assert t.send("explanations", "shapes", a) == 200
    assert t.send("explanations", "shapes", b) == 200
    assert t.explain_json("shapes", {"data": base64.b64encode(a).decode(), "method": "gradcam++"}) == 200
    # faulty (shapes.mar with inject_fault: error and no cache): 1 prediction, 2 failed explanations
    assert t.send("predictions", "faulty", a) == 200
    assert [t.send("explanations", "faulty", img, {"X-Priority": "high"}) for img in (a, b)] == [503, 503]
    assert t.send("explanations", "faulty", a) == 403  # policy: priority (its environment override)
    # notes (tiny text model, explanation token required, no cache)
    good, bad = {"X-Explain-Token": TOKEN}, {"X-Explain-Token": "wrong"}
    assert [t.send("predictions", "notes", text.encode(), {"Content-Type": "text/plain"})
            for text in ("great soup", "rude staff")] == [200, 200]
    assert t.explain_json("notes", {"data": "the soup was great"}, good) == 200  # layer_ig, the default
    assert t.explain_json("notes", {"data": "the soup was great", "method": "grad_x_input"}, good) == 200
    assert t.explain_json("notes", {"data": "the soup was great"}, bad) == 403
    assert t.explain_json("notes", {"data": "the soup was bad"}) == 403
    assert t.explain_json("notes", {"data": "the soup was great", "method": "grad_x_input"}, bad) == 403
    # past its deadline: 1 ms for 1,024 integration steps of a long text
    assert t.explain_json("notes", {"data": LONG, "n_steps": 1024, "deadline_ms": 1}, good) == 504
    # its audit trail locked by another writer past explain.audit.timeout_ms: 503, no record, not served
    lock = sqlite3.connect(notes_trail, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        assert t.explain_json("notes", {"data": "the soup was great"}, good) == 503
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    # lanes (asyncCommunication): one worker batch, a slow explanation and 3 predictions answered before it ends
    assert mixed_batch(t, "lanes", {"data": LONG, "n_steps": 512}, {}, 3) == [200] * 4
    # the same served synchronously: one batch, answered whole (nothing early)
    assert mixed_batch(t, "notes", {"data": LONG, "n_steps": 512}, good, 3) == [200] * 4
    expected = {
        ("ExplanationsServed", "shapes", "gradcam"): 3, ("ExplanationsServed", "shapes", "gradcam++"): 1,
        ("ExplanationCacheHits", "shapes", "gradcam"): 1,
        ("ExplanationCacheMisses", "shapes", "gradcam"): 2, ("ExplanationCacheMisses", "shapes", "gradcam++"): 1,
        ("ExplanationsFailed", "faulty", "gradcam"): 2, ("ExplanationsDenied", "faulty", "gradcam", "priority"): 1,
        ("ExplanationsServed", "notes", "layer_ig"): 2, ("ExplanationsServed", "notes", "grad_x_input"): 1,
        ("ExplanationsDenied", "notes", "layer_ig", "token"): 2, ("ExplanationsDenied", "notes", "grad_x_input", "token"): 1,
        ("ExplanationsTimedOut", "notes", "layer_ig"): 1,
        ("ExplanationsServed", "lanes", "layer_ig"): 1,
        ("EarlyAnswers", "lanes", "layer_ig"): 3,
        ("AuditRecordsLost", "shapes", "gradcam"): 3, ("AuditRecordsLost", "shapes", "gradcam++"): 1,
        ("AuditRecordsWritten", "notes", "layer_ig"): 2, ("AuditRecordsWritten", "notes", "grad_x_input"): 1,
        ("AuditRecordsFailed", "notes", "layer_ig"): 1,
    }
    return t, expected


def mixed_batch(t: Traffic, model, explanation, headers, predictions) -> list[int]:
    """The explanation first, then ``predictions`` plain texts, 50 ms apart: within the
    model's maxBatchDelay (500 ms), so that they form one batch."""
    results = [None] * (1 + predictions)

    def run(i):
        if i == 0:
            results[i] = t.explain_json(model, explanation, headers)
        else:
            results[i] = t.send("predictions", model, f"prediction number {i}".encode(), {"Content-Type": "text/plain"})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(1 + predictions)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=300)
    return results


def samples(text: str) -> list:
    """Every sample of a scrape, parsed by prometheus_client (which names a counter's
    samples ``<name>_total``; TorchServe's exposition and so Prometheus use ``<name>``)."""
    return [s for family in prometheus_parser.text_string_to_metric_families(text) for s in family.samples]


def exposed_names(text: str) -> set[str]:
    """The sample names as exposed, i.e. as Prometheus stores and PromQL selects them."""
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def explanation_counts(text: str) -> dict:
    """{(metric, model, method): value} of the explanation counters and of the latency
    histogram's _count, from a scrape."""
    counts = {}
    for s in samples(text):
        name = s.name.removesuffix("_total")
        if name in EXPLANATION_METRICS or name == "ExplanationLatencySeconds_count":
            reason = (s.labels["Reason"],) if name == "ExplanationsDenied" else ()
            counts[(name, s.labels["ModelName"], s.labels["Method"], *reason)] = s.value
    return counts


@pytest.fixture(scope="module")
def scrape(demo_store, tmp_path_factory):
    """(scrape text, traffic sent, expected explanation counts, the handler's batch log lines)."""
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("metrics")
    build_text_mar(tmp, "notes", config={"batchSize": 8, "maxBatchDelay": 500,
                                         "explain": {"n_steps": 16, "max_n_steps": 1024, "cache_mb": 0,
                                                     "internal_batch_size": 512}})
    build_text_mar(tmp, "lanes", config={"asyncCommunication": True, "batchSize": 1,
                                         "explain": {"n_steps": 16, "max_n_steps": 1024, "cache_mb": 0,
                                                     "internal_batch_size": 512, "async_batch_size": 8,
                                                     "async_max_batch_delay_ms": 500}})
    shutil.copy(demo_store / "shapes.mar", tmp / "store" / "shapes.mar")
    (tmp / "not-a-folder").write_text("")
    env = {"TSEXPLAIN_FAULTY_INJECT_FAULT": "error", "TSEXPLAIN_FAULTY_CACHE_MB": "0", "TSEXPLAIN_FAULTY_POLICY": "priority",
           "TSEXPLAIN_NOTES_TOKEN_ENV": "NOTES_EXPLAIN_TOKEN", "NOTES_EXPLAIN_TOKEN": TOKEN,
           "TSEXPLAIN_SHAPES_AUDIT_RECORD": "all", "TSEXPLAIN_SHAPES_AUDIT_ON_FAILURE": "serve",
           "TSEXPLAIN_SHAPES_AUDIT_SINK": f"sqlite://{tmp}/not-a-folder/audit.db",
           "TSEXPLAIN_NOTES_AUDIT_RECORD": "all", "TSEXPLAIN_NOTES_AUDIT_SINK": f"sqlite://{tmp}/notes-audit.db",
           "TSEXPLAIN_NOTES_AUDIT_TIMEOUT_MS": "300"}
    models = {"shapes": "shapes.mar", "faulty": "shapes.mar", "notes": "notes.mar", "lanes": "lanes.mar"}
    with TorchServe(tmp / "store", models, tmp / "ts", properties=shipped_metrics_properties(), env=env) as ts:
        traffic, expected = send_traffic(ts, tmp / "notes-audit.db")
        served = {key[1:]: n for key, n in expected.items() if key[0] == "ExplanationsServed"}
        want = {**expected, **{("ExplanationLatencySeconds_count", model, method): n
                               for (model, method), n in served.items()}}
        # the frontend reads the workers' metric lines asynchronously: wait until they are in
        deadline = time.monotonic() + 30
        while True:
            status, body = ts.request("GET", f"{ts.metrics_url}/metrics", api="metrics")
            assert status == 200
            text = body.decode()
            if explanation_counts(text) == want or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        batches = re.findall(r"batch size=(\d+) explained=(\d+) answered_early=(\d+)", ts.log_text())
    return text, traffic, want, [tuple(map(int, b)) for b in batches]


def test_explanation_series_per_model_and_method_equal_what_was_sent(scrape):
    text, _, want, batches = scrape
    assert (4, 1, 3) in batches  # the async worker batch formed (else EarlyAnswers would differ for that reason)
    assert (4, 1, 0) in batches  # the synchronous one too, answered whole
    assert explanation_counts(text) == want


def test_latency_histogram_has_buckets_in_seconds(scrape):
    text, _, want, _ = scrape
    buckets = [s for s in samples(text) if s.name == "ExplanationLatencySeconds_bucket"]
    bounds = sorted({float(s.labels["le"]) for s in buckets})
    assert bounds[0] == 0.005 and bounds[-2] == 10 and bounds[-1] == float("inf")
    for s in samples(text):
        if s.name == "ExplanationLatencySeconds_sum":
            assert 0 < s.value < 60 * want[("ExplanationLatencySeconds_count", s.labels["ModelName"], s.labels["Method"])]


def test_torchserve_own_series_keep_working(scrape):
    text, traffic, _, _ = scrape
    found = samples(text)
    requests = {s.labels["model_name"]: s.value for s in found if s.name == "ts_inference_requests_total"}
    assert requests == traffic.requests
    five_xx = sum(1 for _, _, status in traffic.statuses if status >= 500)
    assert [s.value for s in found if s.name == "Requests5XX_total"] == [five_xx]
    for name in ("HandlerTime", "PredictionTime"):
        assert {s.labels["ModelName"] for s in found if s.name == name} == set(traffic.requests), name
    assert {"Requests2XX", "Requests4XX", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds",
            "CPUUtilization", "MemoryUsed"} <= exposed_names(text)


def test_every_model_series_is_declared_with_its_type(scrape):
    """Each series a worker emitted is declared in deploy/metrics.yaml with the type it has on
    /metrics (none came in through model_metrics_auto_detect), and each declared explanation
    metric was seen."""
    text, _, _, _ = scrape
    declared = {m["name"]: (kind, m["dimensions"]) for kind, entries in yaml.safe_load(METRICS_YAML.read_text())
                ["model_metrics"].items() for m in entries}
    seen = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        if any("ModelName" in s.labels for s in family.samples):
            seen[family.name] = (family.type, list(family.samples[0].labels))
    for name, (kind, labels) in seen.items():
        assert name in declared, f"{name} is emitted but not declared in {METRICS_YAML.name}"
        assert kind == declared[name][0], name
        assert [label for label in labels if label != "le"] == declared[name][1] + ["Hostname"], name
    assert set(declared) == set(seen)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects, with Grafana's variables replaced by values."""
    promql = pytest.importorskip("promql_parser", reason="needs the test extra (promql-parser)")
    concrete = expr.replace("$__rate_interval", "5m").replace("$model", ".*").replace("$method", ".*")
    names = set()
    promql.walk(promql.parse(concrete), lambda node: names.add(node.name) if isinstance(node, promql.VectorSelector) else None)
    return names


def test_dashboard_queries_only_scraped_series(scrape):
    text, _, _, _ = scrape
    scraped = exposed_names(text)
    queries = dashboard_queries()
    assert len(queries) >= 8
    for title, expr in queries:
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= scraped, (title, names - scraped)


def test_dashboard_has_the_operator_panels():
    """Rate and share of traffic, p50/p99 latency by method, denials, failures and time-outs, cache hit
    rate: each is a query of the dashboard; every variable a query uses is defined."""
    board = json.loads(DASHBOARD.read_text())
    queries = [expr for _, expr in dashboard_queries()]
    variables = {v["name"] for v in board["templating"]["list"]}

    def some(*parts):
        return any(all(part in q for part in parts) for q in queries)

    assert some("rate(ExplanationsServed", "ts_inference_requests_total", "/ on (ModelName)")
    for q in ("0.5", "0.99"):
        assert some(f"histogram_quantile({q},", "ExplanationLatencySeconds_bucket", "Method")
    assert some("ExplanationsDenied") and some("ExplanationsFailed") and some("ExplanationsTimedOut")
    assert some("ExplanationCacheHits", "ExplanationCacheMisses", "/")
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and set(panel["gridPos"]) == {"x", "y", "w", "h"}
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "1"}
            assert used <= variables, (panel["title"], used - variables)
