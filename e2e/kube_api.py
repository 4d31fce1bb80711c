#!/usr/bin/env python3
"""A Kubernetes API server for tests: the kmock emulator (PyPI kmock==0.8) plus an adapter.

kmock serves discovery and the HTTP plumbing. As shipped it lacks what controllers and kubectl
rely on (see ../shared/k8s-test-apiserver.md): resourceVersion/uid/generation, PUT with
optimistic concurrency, watches that resume from a resourceVersion, label selectors, list kinds,
NotFound reasons, /status isolation, server-side apply create, the namespaces URL. The adapter
below keeps objects itself and implements those semantics; kmock does everything else.

Usage: kube_api.py PORT [--without GROUP]... [--crds FILE]...
  (prints "ready" when serving; writes no files)
  --without GROUP   do not serve the built-in kinds of GROUP (e.g. an install without our CRDs)
  --crds FILE       serve the served versions of the CustomResourceDefinitions in FILE (e.g. the
                    Gateway API v1.4 CRDs instead of the built-in list); creating a CRD object
                    later registers its kinds too, as a real API server does
  --token-key KEY   answer TokenReviews: tokens are HS256 JWTs signed with KEY, shaped like
                    projected ServiceAccount tokens (aud, exp, kubernetes.io.{namespace,
                    serviceaccount.name, pod.name, node.name}); bad signature, expiry or audience
                    give authenticated: false with the reason
"""

import asyncio
import copy
import gc
import json
import sys
import time
import uuid

import aiohttp.web
import kmock
import yaml

# (group, version, plural, kind, namespaced)
RESOURCES = [
    ("", "v1", "namespaces", "Namespace", False),
    ("", "v1", "services", "Service", True),
    ("", "v1", "secrets", "Secret", True),
    ("", "v1", "configmaps", "ConfigMap", True),
    ("", "v1", "pods", "Pod", True),
    ("", "v1", "serviceaccounts", "ServiceAccount", True),
    ("", "v1", "nodes", "Node", False),
    ("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    ("coordination.k8s.io", "v1", "leases", "Lease", True),
    ("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False),
    # What the Helm chart installs besides.
    ("apps", "v1", "deployments", "Deployment", True),
    ("apps", "v1", "daemonsets", "DaemonSet", True),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False),
    ("gateway.networking.k8s.io", "v1", "gatewayclasses", "GatewayClass", False),
    ("gateway.networking.k8s.io", "v1", "gateways", "Gateway", True),
    ("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", True),
    ("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute", True),
    ("gateway.networking.k8s.io", "v1", "tlsroutes", "TLSRoute", True),
    ("gateway.networking.k8s.io", "v1", "tcproutes", "TCPRoute", True),
    ("gateway.networking.k8s.io", "v1", "referencegrants", "ReferenceGrant", True),
    ("gateway.networking.k8s.io", "v1beta1", "referencegrants", "ReferenceGrant", True),
    ("ferrum.dev", "v1alpha1", "backends", "Backend", True),
    ("ferrum.dev", "v1alpha1", "backendpolicies", "BackendPolicy", True),
    ("ferrum.dev", "v1alpha1", "ratelimitpolicies", "RateLimitPolicy", True),
    ("ferrum.dev", "v1alpha1", "meshconfigs", "MeshConfig", True),
]
INFO = {}
VERSIONS = set()
WITHOUT = set()
CRD_FILES = []
TOKEN_KEY = None
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


def token_review(body):
    """The API server's answer to a TokenReview, for tokens minted with TOKEN_KEY."""
    import jwt  # PyJWT

    spec = body.get("spec", {})
    wanted = spec.get("audiences") or []
    status = {"authenticated": False}
    try:
        claims = jwt.decode(spec.get("token", ""), TOKEN_KEY, algorithms=["HS256"], audience=wanted or None,
                            options={"verify_aud": bool(wanted)})
        k8s = claims.get("kubernetes.io", {})
        ns, sa = k8s["namespace"], k8s["serviceaccount"]["name"]
        aud = claims.get("aud")
        aud = aud if isinstance(aud, list) else [aud]
        status = {
            "authenticated": True,
            "audiences": [a for a in aud if a in wanted] if wanted else aud,
            "user": {
                "username": f"system:serviceaccount:{ns}:{sa}",
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": [k8s.get("pod", {}).get("name", "")],
                    "authentication.kubernetes.io/node-name": [k8s.get("node", {}).get("name", "")],
                },
            },
        }
    except Exception as e:  # noqa: BLE001 - every failure is an unauthenticated answer
        status["error"] = f"{type(e).__name__}: {e}"
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {},
            "spec": spec, "status": status}


def crd_resources(crd):
    """(group, version, plural, kind, namespaced) of every served version of a CRD object."""
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    for v in spec.get("versions", []):
        if v.get("served", True):
            yield (spec["group"], v["name"], names["plural"], names["kind"], spec.get("scope") == "Namespaced")


def status(code, reason, message):
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": reason, "message": message, "code": code}
    return aiohttp.web.json_response(body, status=code)


def merge(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def json_patch(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1] if parts else None
        kind = op["op"]
        if kind == "test":
            cur = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if cur != op.get("value"):
                raise ValueError(f"test failed at {op['path']}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last, None)
    return doc


def selector_matches(sel, labels):
    for term in filter(None, (t.strip() for t in sel.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class Adapter(kmock.KubernetesEmulator):
    """kmock's emulator, with object storage and watches that behave like kube-apiserver's."""

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        self.store = {}  # (group, plural, namespace, name) -> object
        self.log = []  # (rv, group, plural, event)
        self.rv = 0
        self.changed = asyncio.Condition()
        for r in RESOURCES:
            if r[0] not in WITHOUT:
                self.register(*r)
        for f in CRD_FILES:
            with open(f) as fh:
                for doc in yaml.safe_load_all(fh):
                    if doc and doc.get("kind") == "CustomResourceDefinition":
                        for r in crd_resources(doc):
                            self.register(*r)
        self._put(("", "namespaces", "", "default"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}, "ADDED")

    def register(self, g, v, p, k, ns):
        INFO[(g, p)] = (k, ns)
        VERSIONS.add((g, v, p))
        self.resources[f"{g}/{v}/{p}"] = kmock.ResourceInfo(
            kind=k, namespaced=ns, singular=k.lower(), subresources={"status"},
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"})

    # Discovery: kmock names the core group version "/v1"; kube-apiserver says "v1".
    async def _serve_version(self, request):
        body = await super()._serve_version(request)
        if body.get("groupVersion", "").startswith("/"):
            body["groupVersion"] = body["groupVersion"][1:]
        return body

    def _parse(self, path):
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        plural, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
        if (group, version, plural) not in VERSIONS:
            return None
        return group, version, plural, ns, name, sub

    async def __call__(self, raw):
        if TOKEN_KEY and raw.method == "POST" and raw.path.rstrip("/") == TOKEN_REVIEWS:
            return aiohttp.web.json_response(token_review(json.loads(await raw.read())), status=201)
        parsed = self._parse(raw.path)
        if parsed is None:
            return await super().__call__(raw)
        try:
            return await self._serve(raw, *parsed)
        except (ValueError, KeyError, TypeError, yaml.YAMLError) as e:
            return status(400, "BadRequest", f"{type(e).__name__}: {e}")

    def _put(self, key, obj, kind):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if kind == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = obj
        self.log.append((self.rv, key[0], key[1], {"type": kind, "object": copy.deepcopy(obj)}))

    async def _notify(self):
        async with self.changed:
            self.changed.notify_all()

    def _out(self, obj, group, version):
        obj = copy.deepcopy(obj)
        obj["apiVersion"] = f"{group}/{version}" if group else version
        return obj

    async def _serve(self, raw, group, version, plural, ns, name, sub):
        kind, namespaced = INFO[(group, plural)]
        q = raw.query
        method = raw.method
        if namespaced and name is not None and ns is None:
            return status(404, "NotFound", f"{plural} is namespaced")
        if method == "GET" and q.get("watch") in ("true", "1"):
            return await self._watch(raw, group, version, plural, ns, name)
        if method == "GET" and name is None:
            items = [self._out(o, group, version) for (g, p, n, _), o in sorted(self.store.items())
                     if g == group and p == plural and (ns is None or n == ns)
                     and selector_matches(q.get("labelSelector", ""), o["metadata"].get("labels") or {})
                     and self._fields_match(q.get("fieldSelector", ""), o)]
            return aiohttp.web.json_response({"kind": f"{kind}List", "apiVersion": f"{group}/{version}" if group else version,
                                              "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        key = (group, plural, ns or "", name)
        body = await raw.read()
        if method == "POST" and name is None:
            obj = json.loads(body)
            obj.setdefault("metadata", {})
            name = obj["metadata"].get("name")
            if not name and obj["metadata"].get("generateName"):
                name = obj["metadata"]["generateName"] + uuid.uuid4().hex[:5]
                obj["metadata"]["name"] = name
            key = (group, plural, ns or "", name)
            if key in self.store:
                return status(409, "AlreadyExists", f'{plural} "{name}" already exists')
            return await self._create(key, obj, kind, group, version, ns, q)
        current = self.store.get(key)
        if method == "GET":
            if current is None:
                return status(404, "NotFound", f'{plural} "{name}" not found')
            return aiohttp.web.json_response(self._out(current, group, version))
        if method == "DELETE":
            if current is None:
                return status(404, "NotFound", f'{plural} "{name}" not found')
            if current["metadata"].get("finalizers"):
                current = copy.deepcopy(current)
                current["metadata"].setdefault("deletionTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                self._put(key, current, "MODIFIED")
            else:
                self._put(key, copy.deepcopy(current), "DELETED")
            await self._notify()
            return aiohttp.web.json_response(self._out(current, group, version))
        ctype = raw.headers.get("Content-Type", "").split(";")[0]
        if method == "PATCH" and ctype == "application/apply-patch+yaml":
            patch = yaml.safe_load(body)
            if current is None:
                return await self._create(key, patch, kind, group, version, ns, q)
            new = merge(current, patch)
        elif method == "PATCH":
            if current is None:
                return status(404, "NotFound", f'{plural} "{name}" not found')
            data = json.loads(body)
            new = json_patch(current, data) if ctype == "application/json-patch+json" else merge(current, data)
        elif method == "PUT":
            if current is None:
                return status(404, "NotFound", f'{plural} "{name}" not found')
            new = json.loads(body)
            want = (new.get("metadata") or {}).get("resourceVersion")
            if want and want != current["metadata"]["resourceVersion"]:
                return status(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified')
        else:
            return status(405, "MethodNotAllowed", f"{method} is not supported here")
        return await self._update(key, current, new, sub, group, version, q)

    def _fields_match(self, sel, obj):
        """Field selectors: `a.b=v`, `a.b==v`, `a.b!=v`, comma-separated."""
        for term in filter(None, (t.strip() for t in sel.split(","))):
            negate = "!=" in term
            k, v = term.split("!=" if negate else "=", 1)
            cur = obj
            for p in k.strip().split("."):
                cur = cur.get(p) if isinstance(cur, dict) else None
            if (str(cur) == v.strip().lstrip("=")) == negate:
                return False
        return True

    async def _create(self, key, obj, kind, group, version, ns, q):
        meta = obj.setdefault("metadata", {})
        if ns is not None:
            meta["namespace"] = ns
        meta.update(uid=str(uuid.uuid4()), generation=1,
                    creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        obj["kind"] = kind
        obj["apiVersion"] = f"{group}/{version}" if group else version
        if q.get("dryRun"):
            return aiohttp.web.json_response(obj, status=201)
        if kind == "CustomResourceDefinition":
            for r in crd_resources(obj):
                self.register(*r)
        self._put(key, obj, "ADDED")
        await self._notify()
        return aiohttp.web.json_response(self._out(obj, group, version), status=201)

    async def _update(self, key, current, new, sub, group, version, q):
        new = copy.deepcopy(new)
        meta = new.setdefault("metadata", {})
        for k in ("uid", "creationTimestamp", "namespace", "name"):
            if k in current["metadata"]:
                meta[k] = current["metadata"][k]
        if sub == "status":
            # Only status changes through /status…
            merged = copy.deepcopy(current)
            merged["status"] = new.get("status")
            new = merged
        else:
            # …and never through the main resource.
            if "status" in current:
                new["status"] = current["status"]
            else:
                new.pop("status", None)
            gen = current["metadata"].get("generation", 1)
            meta["generation"] = gen + 1 if new.get("spec") != current.get("spec") else gen
        new["kind"], new["apiVersion"] = current["kind"], current["apiVersion"]
        if q.get("dryRun"):
            return aiohttp.web.json_response(self._out(new, group, version))
        strip = lambda o: {**o, "metadata": {k: v for k, v in o["metadata"].items() if k != "resourceVersion"}}
        if strip(new) != strip(current):
            self._put(key, new, "MODIFIED")
            await self._notify()
            if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                self._put(key, copy.deepcopy(new), "DELETED")
                await self._notify()
        return aiohttp.web.json_response(self._out(self.store.get(key, new), group, version))

    async def _watch(self, raw, group, version, plural, ns, name):
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(raw)
        q = raw.query
        sel = q.get("labelSelector", "")
        since = int(q.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 3600)
        bookmarks = q.get("allowWatchBookmarks") == "true"

        def wanted(obj):
            m = obj["metadata"]
            return ((ns is None or m.get("namespace") == ns) and (name is None or m.get("name") == name)
                    and selector_matches(sel, m.get("labels") or {}) and self._fields_match(q.get("fieldSelector", ""), obj))

        async def send(ev):
            await resp.write((json.dumps(ev) + "\n").encode())

        if since == 0:
            # No resourceVersion: the current state as ADDED events, then changes.
            for (g, p, _, _), o in sorted(self.store.items()):
                if g == group and p == plural and wanted(o):
                    await send({"type": "ADDED", "object": self._out(o, group, version)})
            since = self.rv
        try:
            while time.monotonic() < deadline:
                # Every write appends one entry and bumps rv by one: entry i has rv i + 1.
                for rv, g, p, ev in self.log[since:]:
                    since = rv
                    if g == group and p == plural and wanted(ev["object"]):
                        await send({"type": ev["type"], "object": self._out(ev["object"], group, version)})
                since = max(since, self.rv)
                async with self.changed:
                    try:
                        await asyncio.wait_for(self.changed.wait(), timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                    except asyncio.TimeoutError:
                        if bookmarks:
                            await send({"type": "BOOKMARK", "object": {"kind": INFO[(group, plural)][0],
                                        "apiVersion": f"{group}/{version}" if group else version,
                                        "metadata": {"resourceVersion": str(self.rv)}}})
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        await resp.write_eof()
        return resp


async def main(port):
    async with Adapter() as api, kmock.Server(api, host="127.0.0.1", port=port):
        print("ready", flush=True)
        await asyncio.Event().wait()


# The store holds every object and watch event: with tens of thousands of them, a full
# (generation 2) garbage collection pauses the server for hundreds of milliseconds, which shows up
# as API latency in the scale benchmarks. Objects here are freed by reference counting; cycles are
# rare and the process is short-lived.
gc.disable()

if __name__ == "__main__":
    args = sys.argv[2:]
    while args:
        flag, value, args = args[0], args[1], args[2:]
        if flag == "--without":
            WITHOUT.add(value)
        elif flag == "--crds":
            CRD_FILES.append(value)
        elif flag == "--token-key":
            TOKEN_KEY = value
        else:
            sys.exit(f"unknown flag {flag}")
    asyncio.run(main(int(sys.argv[1])))
