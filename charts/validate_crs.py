"""Validates the custom resources in rendered manifests against the CRDs that define them
(kubernetes-validate knows only core kinds): each object's openAPIV3Schema for its group, kind
and version, unknown fields rejected where the schema does not preserve them.

usage: validate_crs.py MANIFESTS.yaml CRD.yaml...
"""
import sys

import jsonschema
import yaml


def strict(schema):
    """The schema with additionalProperties false wherever properties are listed (what the API
    server's pruning and strict field validation do)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items() if not str(k).startswith("x-kubernetes")}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


def schemas(paths):
    found = {}
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for v in spec["versions"]:
                    key = (f'{spec["group"]}/{v["name"]}', spec["names"]["kind"])
                    found[key] = strict(v["schema"]["openAPIV3Schema"])
    return found


def main():
    known = schemas(sys.argv[2:])
    failed = checked = 0
    with open(sys.argv[1]) as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            group = key[0].split("/")[0] if "/" in key[0] else ""
            schema = known.get(key)
            if schema is None and ("." not in group or group.endswith(".k8s.io")):
                continue  # a built-in kind: kubernetes-validate's job
            name = f'{key[1]} {doc.get("metadata", {}).get("name")}'
            if schema is None:
                print(f"ERROR {name}: no CRD for {key[0]} {key[1]}")
                failed += 1
                continue
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata", "status")}
            try:
                jsonschema.validate(body, {**schema, "properties": {k: v for k, v in schema.get("properties", {}).items() if k not in ("apiVersion", "kind", "metadata", "status")}})
                checked += 1
                print(f"INFO {name} passed against its CRD")
            except jsonschema.ValidationError as e:
                print(f"ERROR {name}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
                failed += 1
    if failed:
        sys.exit(1)
    print(f"{checked} custom resources valid")


if __name__ == "__main__":
    main()
