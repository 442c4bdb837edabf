"""The README's reference tables, made from the code: request fields (the schema's one
table) and error types (the errors' one table).

    python -m tsexplain.tools.reference            # print the tables
    python -m tsexplain.tools.reference --write README.md   # replace them between their markers

README.md holds each table between ``<!-- reference:NAME -->`` and ``<!-- /reference -->``;
tests/tools/test_reference.py checks that they are the tables made here.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..serving import schema
from ..serving.errors import ERROR_TYPES

MARKER = re.compile(r"(<!-- reference:(?P<name>[\w:-]+) -->\n)(?P<body>.*?)(<!-- /reference -->)", re.S)


def request_table(modality: str) -> str:
    """The JSON fields of a ``modality`` model's requests."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for field in schema.fields(modality).values():
        default = field.default[modality]
        default = "none" if default is None else "required" if default == "required" else f"`{default}`"
        rows.append(f"| `{field.name}` | {field.type} | {default} | {schema.meaning(field, modality)} |")
    return "\n".join(rows) + "\n"


def errors_table() -> str:
    """Every error type, its status and when it is answered."""
    rows = ["| type | status | when |", "|---|---|---|"]
    for kind, (status, when) in sorted(ERROR_TYPES.items(), key=lambda item: (item[1][0], item[0])):
        rows.append(f"| `{kind}` | {status} | {when} |")
    return "\n".join(rows) + "\n"


TABLES = {"request:image": lambda: request_table(schema.IMAGE), "request:text": lambda: request_table(schema.TEXT),
          "errors": errors_table}


def blocks(text: str) -> dict[str, str]:
    """The reference blocks of ``text`` by name."""
    return {m["name"]: m["body"] for m in MARKER.finditer(text)}


def rewrite(text: str) -> str:
    """``text`` with every reference block replaced by the table made from the code."""
    return MARKER.sub(lambda m: m.group(1) + TABLES[m["name"]]() + m.group(4), text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="FILE", help="replace the tables between their markers in FILE")
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(rewrite(path.read_text()))
        return
    for name, table in TABLES.items():
        print(f"<!-- reference:{name} -->\n{table()}<!-- /reference -->\n")


if __name__ == "__main__":
    main()
