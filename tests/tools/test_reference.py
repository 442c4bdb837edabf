"""README's API and configuration reference stay true to the code: the request and error tables
are the ones made from the schema and the errors table, and each configuration table lists
exactly the keys of its settings section."""
import dataclasses
import re
from pathlib import Path

import pytest

from tsexplain.serving import settings
from tsexplain.tools import reference

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_reference_tables_are_made_from_the_code():
    blocks = reference.blocks(README)
    assert set(blocks) == set(reference.TABLES)
    for name, table in reference.TABLES.items():
        assert blocks[name] == table(), f"README's {name} table is stale: python -m tsexplain.tools.reference --write README.md"


def test_a_stale_table_is_noticed():
    stale = README.replace("| `bad_json` | 400 |", "| `bad_json` | 401 |")
    assert reference.blocks(stale)["errors"] != reference.errors_table()
    assert reference.blocks(reference.rewrite(stale))["errors"] == reference.errors_table()


def table_keys(heading: str) -> set[str]:
    """The keys in the first column of the table under ``heading``."""
    section = README[README.index(heading):]
    section = section[: section.index("\n#", 1)]
    keys = set()
    for line in section.splitlines():
        match = re.match(r"\| (`[^|]+`(?:, `[^|]+`)*) \|", line)
        if match:
            keys.update(k.strip("` ") for k in match.group(1).split(","))
    return keys


@pytest.mark.parametrize("heading,cls,exclude", [
    ("### `handler:` (image)", settings.ImageModelSettings, set()),
    ("### `handler:` (text)", settings.TextModelSettings, set()),
    ("### `explain:` (both)", settings.ExplainAccessSettings, set()),
    ("### `explain:` (image)", settings.ImageExplainSettings, {f.name for f in dataclasses.fields(settings.ExplainAccessSettings)}),
    ("### `explain:` (text)", settings.TextExplainSettings, {f.name for f in dataclasses.fields(settings.ExplainAccessSettings)}),
    ("### `explain.audit:`", settings.AuditSettings, set()),
])
def test_configuration_tables_list_every_key(heading, cls, exclude):
    assert table_keys(heading) == {f.name for f in dataclasses.fields(cls)} - exclude

