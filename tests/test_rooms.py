"""The three rooms stay apart: the maths imports no serving code, serving imports no
TorchServe, the tools stay out of both, the handlers stay thin, and every enum is
defined once. Read from the source with ``ast`` (docs/design.md, "Rooms")."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tsexplain"


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def sources(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def offending(folder: Path, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)} imports {name}" for p in sources(folder) for name in sorted(imports(p, root))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_the_maths_imports_no_serving_code_and_no_torchserve():
    assert offending(PACKAGE / "attr", ("tsexplain.serving", "tsexplain.tools", "ts")) == []


def test_serving_imports_no_torchserve_and_no_tools():
    assert offending(PACKAGE / "serving", ("ts", "tsexplain.tools")) == []


def test_the_rooms_tests_need_no_more_than_their_room():
    assert offending(ROOT / "tests" / "attr", ("tsexplain.serving", "tsexplain.tools", "ts", "harness")) == []
    assert offending(ROOT / "tests" / "serving", ("ts", "harness")) == []


def test_the_import_check_can_fail(tmp_path):
    leaky = tmp_path / "tsexplain" / "attr"
    leaky.mkdir(parents=True)
    (leaky / "bad.py").write_text("from ..serving.errors import RequestError\nimport ts.context\nimport torch\n")
    assert offending(leaky, ("tsexplain.serving", "ts"), tmp_path) == [
        "tsexplain/attr/bad.py imports ts.context",
        "tsexplain/attr/bad.py imports tsexplain.serving.errors",
        "tsexplain/attr/bad.py imports tsexplain.serving.errors.RequestError"]


@pytest.mark.parametrize("handler", ["image_explainer.py", "text_explainer.py"])
def test_handlers_are_thin(handler):
    assert len((ROOT / "handlers" / handler).read_text().splitlines()) <= 120


def test_no_module_is_over_about_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in sources(PACKAGE) + sources(ROOT / "handlers")
            if (n := len(p.read_text().splitlines())) > 520}
    assert long == {}


def test_every_enum_is_spelt_out_once():
    """Each member list of the shared enums appears in one module only (the one defining it)."""
    from tsexplain.attr import names
    from tsexplain.serving import schema, settings

    enums = [names.CAM_METHODS, names.IMAGE_IG_METHODS, names.TEXT_METHODS, names.INTEGRATION_METHODS,
             names.BASELINES, names.PRECISIONS, names.LAYOUTS, schema.IMAGE_OUTPUTS, schema.HEATMAP_SIZES,
             settings.POLICIES, settings.ON_DENIED]
    code = {p: p.read_text() for p in sources(PACKAGE) + sources(ROOT / "handlers")}
    for enum in enums:
        spelt = ", ".join(f'"{member}"' for member in enum)
        where = [str(p.relative_to(ROOT)) for p, text in code.items() if spelt in text]
        assert len(where) == 1, (enum, where)
