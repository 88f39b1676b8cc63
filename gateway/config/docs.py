"""The README's configuration tables, written from gateway/config.schema.json.

``python -m gateway.config.docs`` rewrites every table between a pair of markers

    <!-- config:server:begin -->
    <!-- config:server:end -->

(``server``, ``oidc``, ``session``, ``assurance.levels``, ``rules``, ``assertion``,
``step_up``, ``api``, ``telemetry``) and leaves the prose around them alone; ``--check``
only says whether the README is up to date (exit 1 when not). tests/test_config_schema.py
fails when it is not.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from gateway.config.schema import subschema

README = Path(__file__).resolve().parent.parent.parent / "README.md"
_BLOCK = re.compile(
    r"(<!-- config:(?P<name>[a-z_.]+):begin -->\n).*?(<!-- config:(?P=name):end -->)", re.DOTALL
)
_NESTED = ("match", "require", "risk")  # a rule's keys whose own keys get rows


def table(section: str) -> str:
    """The markdown table of the keys of ``section`` (a path as :func:`subschema` takes)."""
    schema = subschema(section + "[]" if section in ("rules", "assurance.levels") else section)
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, prop, required in _rows(schema, ""):
        rows.append(f"| `{key}` | {_default(prop, required)} | {_cell(prop['description'])} |")
    return "\n".join(rows) + "\n"


def _rows(schema: dict[str, Any], prefix: str) -> list[tuple[str, dict[str, Any], bool]]:
    rows = []
    required = schema.get("required", ())
    for key, prop in schema["properties"].items():
        rows.append((prefix + key, prop, key in required))
        if not prefix and key in _NESTED:
            rows.extend(_rows(subschema(f"rules[].{key}"), f"{key}."))
    return rows


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in prop:
        return "—"
    value = prop["default"]
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`[{', '.join(str(item) for item in value)}]`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(readme: str) -> str:
    """``readme`` with every marked table rewritten from the schema."""
    return _BLOCK.sub(lambda m: m.group(1) + table(m.group("name")) + m.group(3), readme)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    paths = [arg for arg in args if arg != "--check"]
    path = Path(paths[0]) if paths else README
    current = path.read_text(encoding="utf-8")
    updated = render(current)
    if check:
        if updated != current:
            print(f"{path}: tables differ from the schema; run: python -m gateway.config.docs")
            return 1
        return 0
    if updated != current:
        path.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
