import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small models: avoids oversubscription on shared CPUs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_store():
    """build/test_model_store with shapes.mar and reviews.mar built from the current code."""
    import build_mar

    demo = ROOT / "build" / "demo"
    if not (demo / "shapes" / "weights.pt").exists() or not (demo / "reviews" / "config.json").exists():
        pytest.fail("the demo models are not trained: run ./run_tests.sh, which trains them first")
    store = ROOT / "build" / "test_model_store"
    build_mar.main(["demo", "--export-path", str(store)])
    return store


@pytest.fixture(scope="session")
def postgres_server():
    """A temporary PostgreSQL cluster on a free loopback port (tests/pg_server.py), for the
    session; skipped, with the reason, only where PostgreSQL cannot be installed."""
    from pg_server import PostgresUnavailable, TemporaryPostgres

    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    server = TemporaryPostgres()
    try:
        server.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL for this test: {exc}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database on the session's PostgreSQL, per test."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]", "_", request.node.name.lower())[:40] + f"_{id(request) % 100000}"
    return postgres_server.create_database(name)
