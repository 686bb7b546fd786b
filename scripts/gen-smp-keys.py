#!/usr/bin/env python3
"""Generates apiserver/src/smp_keys.json — the strategic-merge-patch strategies and merge keys
of the built-in kinds — from apiserver/upstream/strategic-merge-keys.json (every field's
patch strategy, merge key and list type, read from the upstream Go struct tags of
kubernetes/api, apimachinery and apiextensions-apiserver at the version its "source" names).
A test fails when the checked-in file is stale.

Output: {"<group>/<Kind>": {"<field path>": {"strategy": "...", "key": "..."|null}}}, where
field paths use JSON names and "[]" for list elements (`spec.containers[].ports`).
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent
source = root / "apiserver" / "upstream" / "strategic-merge-keys.json"
target = root / "apiserver" / "src" / "smp_keys.json"

GROUPS = {
    "core": "",
    "apps": "apps",
    "discovery": "discovery.k8s.io",
    "events": "events.k8s.io",
    "coordination": "coordination.k8s.io",
    "rbac": "rbac.authorization.k8s.io",
    "apiext": "apiextensions.k8s.io",
}


def generate() -> str:
    data = json.loads(source.read_text())
    out = {}
    for qualified, rows in sorted(data["types"].items()):
        package, kind = qualified.split(".", 1)
        if package not in GROUPS:
            continue  # meta.* are shared types, already expanded into every kind's paths
        fields = {}
        for row in rows:
            if row["patchStrategy"]:
                fields[row["path"]] = {"strategy": row["patchStrategy"], "key": row["patchMergeKey"]}
        out[f"{GROUPS[package]}/{kind}"] = dict(sorted(fields.items()))
    return json.dumps(out, indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    text = generate()
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        sys.exit(0 if target.read_text() == text else 1)
    target.write_text(text)
    print(f"wrote {target.relative_to(root)}")
