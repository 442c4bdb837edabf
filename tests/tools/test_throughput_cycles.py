"""benchmarks/run.py throughput: ABBA cycles, warm-up cycles reported and not counted."""
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class FakeClient:
    """Answers every call at once; fails the calls listed in ``failing`` (by call number)."""

    def __init__(self, failing=()):
        self.model = SimpleNamespace(name="m")
        self.calls, self.failing = [], set(failing)

    def call(self, variant, route, i, stock):
        self.calls.append((variant, stock))
        return (500 if len(self.calls) in self.failing else 200), b"{}", 0.0


def plan():
    from benchmarks import run

    return run.Plan(1, run.Budget(1, 5), run.Budget(1, 5), run.Budget(1, 5), run.Budget(8, 30), run.Budget(1, 5),
                    threads=1, throughput_cycles=2, throughput_warmup_cycles=1)


def test_warmup_cycles_are_reported_but_not_counted():
    from benchmarks import run

    client = FakeClient()
    out = run.throughput(client, plan())
    # 1 warm-up request per variant, then 3 cycles x ABBA x 2 requests (8 over 2 cycles, halved)
    assert len(client.calls) == 2 + 3 * 4 * 2
    assert out["stock"]["requests"] == out["ours"]["requests"] == 2 * 2 * 2  # the two timed cycles only
    assert len(out["warmup_cycle_ratios"]) == 1 and len(out["cycle_ratios"]) == 2
    assert [timed for _, _, timed in out["phase_rps"]] == [False] * 4 + [True] * 8
    assert [side for side, _, _ in out["phase_rps"][:4]] == ["stock", "ours", "ours", "stock"]


def test_an_error_in_a_warmup_cycle_still_counts():
    from benchmarks import run

    client = FakeClient(failing={5})  # after 2 warm-up calls and the cycle's 2 stock ones: ours
    out = run.throughput(client, plan())
    assert client.calls[4] == ("m_b8", False)
    assert out["ours"]["errors"] == 1 and out["stock"]["errors"] == 0


def test_the_report_shows_warmup_cycles_apart():
    from benchmarks.report import _cycles

    assert _cycles({"cycle_ratios": [1.01, 0.99], "warmup_cycle_ratios": [1.09]}) == "(warm-up 1.09) 1.01, 0.99"
    assert _cycles({"cycle_ratios": [1.0], "warmup_cycle_ratios": []}) == "1.0"
