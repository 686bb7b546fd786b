#!/usr/bin/env python3
"""Generates apiserver/src/storage/smp_keys.json — the strategic-merge-patch strategies and merge keys
of every built-in kind — from apiserver/upstream/strategic-merge-keys.json (the upstream
OpenAPI document's patch strategies and type graph; scripts/gen-smp-upstream.py extracts it
from a Kubernetes tree). A test fails when the checked-in file is stale.

Output: {"<group>/<Kind>": {"<field path>": {"strategy": "...", "key": "..."|null}}}, where
field paths use JSON names and "[]" for list elements (`spec.containers[].ports`).
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent
source = root / "apiserver" / "upstream" / "strategic-merge-keys.json"
target = root / "apiserver" / "src" / "storage" / "smp_keys.json"
# Deep enough for every strategy upstream has (a PVC template's metadata inside a pod's
# volumes inside a CronJob's job template is the deepest); recursive types stop here.
MAX_DEPTH = 14


def walk(definitions: dict, name: str, prefix: str, depth: int, out: dict, stack: tuple):
    if depth > MAX_DEPTH or name in stack:
        return
    for prop, field in sorted(definitions.get(name, {}).items()):
        path = f"{prefix}{prop}"
        if "strategy" in field:
            out[path] = {"strategy": field["strategy"], "key": field.get("key")}
        if "ref" in field:
            walk(definitions, field["ref"], f"{path}.", depth + 1, out, stack + (name,))
        elif "items" in field:
            walk(definitions, field["items"], f"{path}[].", depth + 1, out, stack + (name,))


def generate() -> str:
    data = json.loads(source.read_text())
    out = {}
    for kind, definition in sorted(data["kinds"].items()):
        fields = {}
        walk(data["definitions"], definition, "", 0, fields, ())
        if fields:
            out[kind] = dict(sorted(fields.items()))
    return json.dumps(out, indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    text = generate()
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        sys.exit(0 if target.read_text() == text else 1)
    target.write_text(text)
    print(f"wrote {target.relative_to(root)}")
