"""Write docs/configuration.md from the pydantic models of cluster/config.py (the fleet config)
and engines/config.py (the engine's BuilderConfig). `--check` exits 1 if the file is stale."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from cluster.config import FleetConfig, PlacementConfig, RoutingConfig, TimeoutConfig
from engines.config import BuilderConfig

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _type(field: Any) -> str:
    ann = field.annotation
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in get_args(ann))
    if isinstance(ann, type) and issubclass(ann, Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in ann)
    text = getattr(ann, "__name__", None) or str(ann)
    return text.replace("typing.", "").replace("Literal", "one of ").replace("|", "or")


def _default(field: Any) -> str:
    if field.is_required():
        has_default = field.description is not None and "default" in field.description
        return "see description" if has_default else "(required)"
    if field.default_factory is not None:
        value = field.default_factory()
        return json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
    value = field.default
    return json.dumps(value.value if hasattr(value, "value") else value)


def _constraints(field: Any) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "len >="),
                          ("pattern", "matches")):
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sym} `{getattr(meta, attr)}`")
    return ", ".join(parts)


def section(model: type[BaseModel], title: str) -> str:
    doc = inspect.cleandoc(model.__doc__ or "")
    rows = ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type(field)} | `{_default(field)}` | {_constraints(field)} | {desc} |")
    return f"## {title}\n\n{doc}\n\n" + "\n".join(rows) + "\n"


def render() -> str:
    parts = ["# Configuration reference\n",
             "Generated from the pydantic models by `python scripts/gen_config_reference.py`; do not edit.",
             "Unknown keys are refused, and every bad value fails naming its field.\n",
             section(FleetConfig, "Fleet config (`FleetConfig`, the YAML files in `configs/`)"),
             section(PlacementConfig, "`placement`"), section(TimeoutConfig, "`timeouts`"),
             section(RoutingConfig, "`routing`"), section(BuilderConfig, "Engine (`engines.BuilderConfig`)")]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
