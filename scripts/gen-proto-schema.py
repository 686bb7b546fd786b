#!/usr/bin/env python3
"""Generates apiserver/src/proto_schema.json: the protobuf wire schema of the built-in kinds,
so the API server can read `application/vnd.kubernetes.protobuf` request bodies (kubectl 1.32+
and Helm send them for built-in types).

Field numbers and types come from the k8s-pb crate (prost code generated from the upstream
generated.proto files); JSON field names come from the k8s-openapi crate (its serde names),
joined on the Rust field name. Both crates are read from the local Cargo registry, at the
versions in Cargo.lock. A test fails when the checked-in file is stale.

Output: {"messages": {"api.core.v1.Secret": {"<tag>": [json_name, kind, type, repeated]}},
         "roots": {"<apiVersion>/<Kind>": "<message>"}}
kind: a scalar type (string, bool, int32, int64, double, bytes), "message", or
"map" (type = "string,<scalar>" or "string,<message>"). An empty JSON name marks an embedded
(inline) message whose fields belong to the parent in JSON.
"""
import json
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent
target = root / "apiserver" / "src" / "proto_schema.json"
OPENAPI_VERSION_DIR = "v1_33"

# The kinds the API server serves, plus what clients send to its subresources.
ROOTS = {
    "v1/Namespace": "api.core.v1.Namespace", "v1/Node": "api.core.v1.Node",
    "v1/Pod": "api.core.v1.Pod", "v1/Service": "api.core.v1.Service",
    "v1/Endpoints": "api.core.v1.Endpoints", "v1/ConfigMap": "api.core.v1.ConfigMap",
    "v1/Secret": "api.core.v1.Secret", "v1/ServiceAccount": "api.core.v1.ServiceAccount",
    "v1/Event": "api.core.v1.Event", "v1/Binding": "api.core.v1.Binding",
    "events.k8s.io/v1/Event": "api.events.v1.Event",
    "coordination.k8s.io/v1/Lease": "api.coordination.v1.Lease",
    "discovery.k8s.io/v1/EndpointSlice": "api.discovery.v1.EndpointSlice",
    "apps/v1/Deployment": "api.apps.v1.Deployment", "apps/v1/ReplicaSet": "api.apps.v1.ReplicaSet",
    "apps/v1/DaemonSet": "api.apps.v1.DaemonSet",
    "rbac.authorization.k8s.io/v1/Role": "api.rbac.v1.Role",
    "rbac.authorization.k8s.io/v1/ClusterRole": "api.rbac.v1.ClusterRole",
    "rbac.authorization.k8s.io/v1/RoleBinding": "api.rbac.v1.RoleBinding",
    "rbac.authorization.k8s.io/v1/ClusterRoleBinding": "api.rbac.v1.ClusterRoleBinding",
    "apiextensions.k8s.io/v1/CustomResourceDefinition":
        "apiextensions_apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition",
    "autoscaling/v1/Scale": "api.autoscaling.v1.Scale",
    "authentication.k8s.io/v1/TokenRequest": "api.authentication.v1.TokenRequest",
    "meta.k8s.io/v1/DeleteOptions": "apimachinery.pkg.apis.meta.v1.DeleteOptions",
    "v1/DeleteOptions": "apimachinery.pkg.apis.meta.v1.DeleteOptions",
}


# JSON names serde spells differently from the Go field.
OVERRIDES = {"JsonSchemaProps.r#ref": "$ref", "JsonSchemaProps.schema": "$schema"}


def crate_src(name: str) -> pathlib.Path:
    lock = (root / "Cargo.lock").read_text()
    m = re.search(r'name = "%s"\nversion = "([^"]+)"' % re.escape(name), lock)
    if not m:
        sys.exit(f"{name} is not in Cargo.lock")
    for registry in (pathlib.Path.home() / ".cargo" / "registry" / "src").glob("*"):
        path = registry / f"{name}-{m.group(1)}"
        if path.is_dir():
            return path / "src"
    sys.exit(f"{name} {m.group(1)} is not in the Cargo registry (run cargo fetch)")


def norm(name: str) -> str:
    return name.removeprefix("r#").rstrip("_").replace("_", "").lower()


def openapi_names(src: pathlib.Path) -> dict:
    """(module, lowercase struct) -> {normalized rust field: json name}."""
    names = {}
    base = src / OPENAPI_VERSION_DIR
    for path in base.rglob("*.rs"):
        text = path.read_text()
        module = ".".join(path.relative_to(base).parent.parts)
        for struct in re.findall(r"pub struct (\w+) \{", text):
            fields = dict(re.findall(r'"([A-Za-z0-9_$-]+)" => Field::Key_(\w+),', text))
            names.setdefault((module, struct.lower()), {}).update({norm(v): k for k, v in fields.items()})
    return names


PROST = re.compile(r"#\[prost\(([^)]*)\)\]")


def rust_type_to_message(module: str, rtype: str) -> str:
    inner = rtype
    for wrapper in ("::core::option::Option<", "::prost::alloc::vec::Vec<", "::prost::alloc::boxed::Box<"):
        while inner.startswith(wrapper):
            inner = inner[len(wrapper):-1]
    parts = module.split(".")
    segs = inner.split("::")
    while segs and segs[0] == "super":
        parts = parts[:-1]
        segs = segs[1:]
    return ".".join(parts + segs)


def pb_messages(src: pathlib.Path) -> dict:
    messages = {}
    for path in src.rglob("mod.rs"):
        module = ".".join(path.relative_to(src).parent.parts)
        lines = path.read_text().splitlines()
        struct, i = None, 0
        while i < len(lines):
            line = lines[i].strip()
            m = re.match(r"pub struct (\w+) \{", line)
            if m:
                struct = f"{module}.{m.group(1)}"
                messages[struct] = []
            elif line == "}":
                struct = None
            elif struct and (p := PROST.match(line)):
                decl = ""
                i += 1
                while True:
                    decl += (" " if decl else "") + lines[i].strip()
                    if decl.endswith(",") and decl.count("<") == decl.count(">"):
                        break
                    i += 1
                fm = re.match(r"pub ([\w#]+):\s*(.*),$", decl)
                args = p.group(1)
                tag = re.search(r'tag = "(\d+)"', args).group(1)
                kind = args.split(",")[0].split("=")[0].strip()
                repeated = "repeated" in args
                if kind == "btree_map":
                    value = re.search(r'btree_map = "string, (\w+)"', args).group(1)
                    if value == "message":
                        vtype = fm.group(2).rsplit(",", 1)[1].strip()[:-1].strip()
                        value = rust_type_to_message(module, vtype)
                    messages[struct].append((tag, fm.group(1), "map", "string," + value, False))
                elif kind == "message":
                    messages[struct].append((tag, fm.group(1), "message", rust_type_to_message(module, fm.group(2)), repeated))
                else:
                    messages[struct].append((tag, fm.group(1), kind, "", repeated))
            i += 1
    return messages


def camel(name: str) -> str:
    head, *rest = name.removeprefix("r#").rstrip("_").split("_")
    return head + "".join(w.capitalize() for w in rest)


def generate() -> str:
    names = openapi_names(crate_src("k8s-openapi"))
    messages = pb_messages(crate_src("k8s-pb"))
    out, todo, unmatched = {}, list(ROOTS.values()), []
    while todo:
        msg = todo.pop()
        if msg in out or msg not in messages:
            continue
        module, struct = msg.rsplit(".", 1)
        json_names = names.get((module, struct.lower()), {})
        fields = {}
        for tag, rust, kind, typ, repeated in messages[msg]:
            json_name = json_names.get(norm(rust))
            if json_name is None and kind == "message" and json_names and typ in messages:
                # A Go struct embedded with `json:",inline"`: a nested message on the wire,
                # its fields inline in JSON (LocalObjectReference, VolumeSource, ProbeHandler…).
                # (Most, not all, of its fields: the child may have fields newer than k8s-openapi.)
                child = {norm(f[1]) for f in messages[typ]}
                if child and len(child & set(json_names)) * 5 >= len(child) * 4:
                    json_name = ""
            json_name = OVERRIDES.get(f"{struct}.{rust}", json_name)
            if json_name is None:
                json_name = camel(rust)
                if json_names:
                    unmatched.append(f"{msg}.{rust}")
            fields[tag] = [json_name, kind, typ, repeated]
            if kind == "message":
                todo.append(typ)
            elif kind == "map" and not typ.split(",")[1] in ("string", "bytes"):
                todo.append(typ.split(",")[1])
        out[msg] = dict(sorted(fields.items(), key=lambda kv: int(kv[0])))
    if unmatched:
        print("fields without a k8s-openapi name (camelCased):", ", ".join(sorted(unmatched)), file=sys.stderr)
    return json.dumps({"roots": ROOTS, "messages": dict(sorted(out.items()))}, indent=None, separators=(",", ":"), sort_keys=True) + "\n"


if __name__ == "__main__":
    text = generate()
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        sys.exit(0 if target.read_text() == text else 1)
    target.write_text(text)
    print(f"wrote {target.relative_to(root)}")
