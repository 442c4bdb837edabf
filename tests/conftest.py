import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "scripts"))


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
