"""Render a Helm chart offline (like `helm template`) and print its objects as a JSON list.

Used by the operator's real-control-plane tests (operator/tests/envtest) to install the
chart's own RBAC, so the operator runs there with exactly the permissions users install.

Usage: .venv/bin/python scripts/checks/render_chart.py CHART NAMESPACE [KEY=JSON_VALUE ...]
  KEY is a dotted values path (rbac.namespaced), JSON_VALUE a JSON literal (true, "ns").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from delivery_lib import render, strip  # noqa: E402


def set_value(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Sets `values[a][b][c] = value` for the path `a.b.c`."""
    *parents, leaf = dotted.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    chart, namespace = Path(argv[1]), argv[2]
    values: dict[str, Any] = {}
    for pair in argv[3:]:
        key, sep, raw = pair.partition("=")
        if not sep:
            print(f"render_chart: expected KEY=JSON_VALUE, got {pair!r}", file=sys.stderr)
            return 2
        try:
            set_value(values, key, json.loads(raw))
        except json.JSONDecodeError as err:
            print(f"render_chart: {key}: not a JSON value: {err}", file=sys.stderr)
            return 2
    objects = [strip(o) for o in render(chart, values, name="dchat-operator", namespace=namespace)]
    json.dump(objects, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
