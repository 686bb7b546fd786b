#!/usr/bin/env python3
"""Generates apiserver/src/http/proto/schema.json: the protobuf wire schema of every Kubernetes kind
(and its list), so the API server reads `application/vnd.kubernetes.protobuf` request bodies
(client-go, kubectl 1.32+ and Helm send them for built-in types) and writes protobuf responses
for clients that ask for them.

Field numbers and types come from the k8s-pb crate (prost code generated from the upstream
generated.proto files); JSON field names come from the k8s-openapi crate (its serde names),
joined on the Rust field name. Both crates are read from the local Cargo registry, at the
versions in Cargo.lock. A test fails when the checked-in file is stale.

Roots are found, not listed: every message of a stable API version (v1, v2) whose first field
is `metadata` (ObjectMeta: a kind; ListMeta: a list), under its group's apiVersion, plus
DeleteOptions and the meta.k8s.io kinds clients exchange (Status, Table, PartialObjectMetadata).

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
target = root / "apiserver" / "src" / "http" / "proto" / "schema.json"
OPENAPI_VERSION_DIR = "v1_36"

# k8s-pb's package of each API group (`api.<package>.<version>`, or the whole prefix).
GROUPS = {
    "api.core": "", "api.apps": "apps", "api.batch": "batch", "api.autoscaling": "autoscaling",
    "api.policy": "policy", "api.rbac": "rbac.authorization.k8s.io",
    "api.storage": "storage.k8s.io", "api.networking": "networking.k8s.io",
    "api.node": "node.k8s.io", "api.scheduling": "scheduling.k8s.io",
    "api.coordination": "coordination.k8s.io", "api.discovery": "discovery.k8s.io",
    "api.events": "events.k8s.io", "api.certificates": "certificates.k8s.io",
    "api.admissionregistration": "admissionregistration.k8s.io",
    "api.flowcontrol": "flowcontrol.apiserver.k8s.io",
    "api.authentication": "authentication.k8s.io", "api.authorization": "authorization.k8s.io",
    "api.resource": "resource.k8s.io",
    "apiextensions_apiserver.pkg.apis.apiextensions": "apiextensions.k8s.io",
    "kube_aggregator.pkg.apis.apiregistration": "apiregistration.k8s.io",
}
STABLE = re.compile(r"^v\d+$")
META = "apimachinery.pkg.apis.meta.v1"
EXTRA_ROOTS = {
    "v1/DeleteOptions": f"{META}.DeleteOptions", "meta.k8s.io/v1/DeleteOptions": f"{META}.DeleteOptions",
    "v1/Status": f"{META}.Status", "meta.k8s.io/v1/Status": f"{META}.Status",
    "meta.k8s.io/v1/Table": f"{META}.Table",
    "meta.k8s.io/v1/PartialObjectMetadata": f"{META}.PartialObjectMetadata",
    "meta.k8s.io/v1/PartialObjectMetadataList": f"{META}.PartialObjectMetadataList",
}


# Kinds promoted to v1 whose v1 messages k8s-pb does not have yet: v1 has the v1beta1 wire
# messages field for field (checked against upstream's generated.proto of release 1.36), so
# the v1 kinds use them until k8s-pb catches up (then its own v1 messages take over).
ADMISSION_V1BETA1 = "api.admissionregistration.v1beta1"
PROMOTED = {
    f"admissionregistration.k8s.io/v1/{kind}": f"{ADMISSION_V1BETA1}.{kind}"
    for kind in ["MutatingAdmissionPolicy", "MutatingAdmissionPolicyList",
                 "MutatingAdmissionPolicyBinding", "MutatingAdmissionPolicyBindingList"]
}


def roots(messages: dict) -> dict:
    found = {k: v for k, v in PROMOTED.items() if v in messages}
    found.update(EXTRA_ROOTS)
    for msg, fields in messages.items():
        module, kind = msg.rsplit(".", 1)
        package, version = module.rsplit(".", 1)
        if package not in GROUPS or not STABLE.match(version):
            continue
        first = next((f for f in fields if f[0] == "1"), None)
        if first and first[1] == "metadata" and first[3] in (f"{META}.ObjectMeta", f"{META}.ListMeta"):
            group = GROUPS[package]
            found[f"{group}/{version}/{kind}" if group else f"{version}/{kind}"] = msg
    return dict(sorted(found.items()))


# JSON names serde spells differently from the Go field.
# Also the fields of Go structs embedded inline whose own struct k8s-openapi does not have
# (VolumeSource in Volume, PersistentVolumeSource in PersistentVolumeSpec): camelCasing the
# Rust name misses their acronyms.
OVERRIDES = {
    "JsonSchemaProps.r#ref": "$ref",
    "JsonSchemaProps.schema": "$schema",
    "VolumeSource.downward_api": "downwardAPI",
    "VolumeSource.scale_io": "scaleIO",
    "PersistentVolumeSource.scale_io": "scaleIO",
}


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
    # Declarations span lines: drop the whitespace and the trailing commas rustfmt leaves
    # inside generic arguments (`Option<\n    super::...::ObjectMeta,\n>`).
    inner = re.sub(r"\s+", "", rtype).replace(",>", ">")
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
                        # BTreeMap<String, Type>: the value type is the second argument.
                        generic = re.sub(r"\s+", "", fm.group(2)).replace(",>", ">")
                        vtype = generic.split("<", 1)[1].rsplit(">", 1)[0].split(",", 1)[1]
                        value = rust_type_to_message(module, vtype)
                    messages[struct].append((tag, fm.group(1), "map", "string," + value, False))
                elif kind == "message":
                    messages[struct].append((tag, fm.group(1), "message", rust_type_to_message(module, fm.group(2)), repeated))
                else:
                    messages[struct].append((tag, fm.group(1), kind, "", repeated))
            i += 1
    return messages


def flattened(messages: dict, msg: str, depth: int = 2) -> set:
    """The normalized field names of `msg`, with those of its message fields too (a Go struct
    inlined into one that is itself inlined: RuleWithOperations holds Rule)."""
    names = set()
    for _, rust, kind, typ, _ in messages.get(msg, []):
        names.add(norm(rust))
        if kind == "message" and depth > 0 and typ in messages:
            names |= flattened(messages, typ, depth - 1)
    return names


def camel(name: str) -> str:
    head, *rest = name.removeprefix("r#").rstrip("_").split("_")
    return head + "".join(w.capitalize() for w in rest)


def generate() -> str:
    names = openapi_names(crate_src("k8s-openapi"))
    messages = pb_messages(crate_src("k8s-pb"))
    found_roots = roots(messages)
    out, todo, unmatched = {}, list(found_roots.values()), []
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
                known = set(json_names)
                mostly = lambda names: names and len(names & known) * 5 >= len(names) * 4
                if mostly({norm(f[1]) for f in messages[typ]}) or mostly(flattened(messages, typ)):
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
    return json.dumps({"roots": found_roots, "messages": dict(sorted(out.items()))}, indent=None, separators=(",", ":"), sort_keys=True) + "\n"


if __name__ == "__main__":
    text = generate()
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        sys.exit(0 if target.read_text() == text else 1)
    target.write_text(text)
    print(f"wrote {target.relative_to(root)}")
