#!/usr/bin/env python3
"""Extracts apiserver/upstream/strategic-merge-keys.json from a Kubernetes source tree: the
part of its OpenAPI document (api/openapi-spec/swagger.json) that strategic merge patch
needs — for every definition, the fields that lead to other definitions and the fields with
an `x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key` (the Go struct tags) — and
which definition each kind (of a stable API version) is.

    gen-smp-upstream.py KUBERNETES_TREE

Run it when moving to a new Kubernetes version; scripts/gen-smp-keys.py then derives the
per-kind table the server embeds (apiserver/src/storage/smp_keys.json) from what this writes. The
tree is only read here: the extract is checked in, so the build needs no Kubernetes source.
"""
import json
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent
target = root / "apiserver" / "upstream" / "strategic-merge-keys.json"
STABLE = re.compile(r"^v\d+$")


def ref_name(schema: dict):
    ref = schema.get("$ref") or (schema.get("items") or {}).get("$ref")
    return ref.rsplit("/", 1)[1] if ref else None


def version_rank(version: str) -> int:
    return int(version[1:]) if STABLE.match(version) else -1


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    tree = pathlib.Path(sys.argv[1])
    swagger = json.loads((tree / "api/openapi-spec/swagger.json").read_text())
    version = swagger.get("info", {}).get("version", "unknown")
    definitions, kinds = {}, {}
    for name, definition in swagger["definitions"].items():
        fields = {}
        for prop, schema in (definition.get("properties") or {}).items():
            entry = {}
            ref = ref_name(schema)
            if ref:
                entry["items" if "items" in schema else "ref"] = ref
            if "x-kubernetes-patch-strategy" in schema:
                entry["strategy"] = schema["x-kubernetes-patch-strategy"]
                if "x-kubernetes-patch-merge-key" in schema:
                    entry["key"] = schema["x-kubernetes-patch-merge-key"]
            if entry:
                fields[prop] = entry
        if fields:
            definitions[name] = fields
        for gvk in definition.get("x-kubernetes-group-version-kind") or []:
            if not STABLE.match(gvk["version"]) or gvk["kind"].endswith("List"):
                continue
            key = f"{gvk['group']}/{gvk['kind']}"
            # One table per group and kind: the newest stable version's shape.
            previous = kinds.get(key)
            if previous is None or version_rank(gvk["version"]) > previous[0]:
                kinds[key] = (version_rank(gvk["version"]), name)
    out = {
        "source": f"api/openapi-spec/swagger.json of Kubernetes {version}",
        "kinds": {k: v[1] for k, v in sorted(kinds.items())},
        "definitions": dict(sorted(definitions.items())),
    }
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target.relative_to(root)}: {len(kinds)} kinds, {len(definitions)} definitions")


if __name__ == "__main__":
    main()
