#!/usr/bin/env python3
"""ferrum-dp against a direct connection, nginx, HAProxy and Envoy, on this machine, interleaved:
as an HTTP proxy (HTTP/1.1 and h2c) and as a TCP proxy (a TCPRoute; nginx stream, HAProxy mode
tcp, Envoy tcp_proxy) carrying the same HTTP/1.1 load.

Started by `make bench` (bench/run.sh installs the tools and builds ferrum-dp first).
Every target fronts the same nginx backend (64-byte body, keep-alive); every load run uses the
same wrk/h2load settings; rounds are interleaved so drift hits all targets alike.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
DP = TARGET_DIR / "release" / "ferrum-dp"
BODY = "x" * 63 + "\n"  # 64 bytes

BACKEND, DIRECT = 18080, 18080
PORTS = {"ferrum-dp": 18081, "nginx": 18082, "envoy": 18083, "haproxy": 18084}
# The floor (dataplane/examples/http_floor.rs): the least an HTTP/1.1 relay on tokio does.
FLOOR = 18085
PROXIES = ("ferrum-dp", "nginx", "haproxy", "envoy")
# Each proxy's TCP listener (L4: bytes relayed, nothing parsed).
TCP_OFFSET = 200
NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"


def wait_port(port, timeout=15.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, name, argv, **kw):
        log = open(WORK / f"{name}.log", "w")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def pid(self, name):
        return next(p.pid for n, p in self.procs if n == name)

    def stop(self, p):
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(5)
        except Exception:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except Exception:
                pass

    def stop_all(self):
        for _, p in reversed(self.procs):
            self.stop(p)


def nginx_conf(path, listen, body=None, upstream=None, workers=2):
    loc = (
        f'return 200 "{body}";'
        if body is not None
        else f"proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\";"
    )
    ups = (
        f"upstream backend {{ server 127.0.0.1:{upstream}; keepalive 128; keepalive_requests 100000; }}"
        if upstream
        else ""
    )
    stream = (
        f"load_module {NGINX_STREAM};\n"
        if upstream
        else ""
    )
    stream_block = (
        f"stream {{ upstream tcp_backend {{ server 127.0.0.1:{upstream}; }} "
        f"server {{ listen 127.0.0.1:{listen + TCP_OFFSET} reuseport; proxy_pass tcp_backend; }} }}"
        if upstream
        else ""
    )
    path.write_text(
        f"""{stream}worker_processes {workers};
daemon off;
pid {path}.pid;
error_log {WORK}/{path.stem}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path {WORK}/tmp;
  proxy_temp_path {WORK}/tmp;
  {ups}
  server {{
    listen 127.0.0.1:{listen} reuseport;
    listen 127.0.0.1:{listen + 100} http2;
    location / {{ default_type text/plain; {loc} }}
  }}
}}
{stream_block}
"""
    )


def haproxy_conf(path, listen, upstream):
    """HTTP/1.1 on `listen`, h2c (prior knowledge) on `listen + 100`; upstream connections reused."""
    path.write_text(
        f"""global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend h1
  bind 127.0.0.1:{listen}
  default_backend be
frontend h2
  bind 127.0.0.1:{listen + 100} proto h2
  default_backend be
backend be
  server s1 127.0.0.1:{upstream}
listen tcp
  mode tcp
  bind 127.0.0.1:{listen + TCP_OFFSET}
  server s1 127.0.0.1:{upstream}
"""
    )


def cpu_seconds(pid):
    """User + system CPU of a process and its children processes (nginx's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        pids += [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def envoy_conf(path, listen, upstream):
    path.write_text(
        json.dumps(
            {
                "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18901}}},
                "static_resources": {
                    "listeners": [
                        {
                            "name": "tcp",
                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen + TCP_OFFSET}},
                            "filter_chains": [
                                {
                                    "filters": [
                                        {
                                            "name": "envoy.filters.network.tcp_proxy",
                                            "typed_config": {
                                                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                                "stat_prefix": "tcp",
                                                "cluster": "backend",
                                            },
                                        }
                                    ]
                                }
                            ],
                        },
                        {
                            "name": "l",
                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                            "filter_chains": [
                                {
                                    "filters": [
                                        {
                                            "name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": {
                                                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                                "stat_prefix": "bench",
                                                "codec_type": "AUTO",
                                                "route_config": {
                                                    "virtual_hosts": [
                                                        {
                                                            "name": "all",
                                                            "domains": ["*"],
                                                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                                                        }
                                                    ]
                                                },
                                                "http_filters": [
                                                    {
                                                        "name": "envoy.filters.http.router",
                                                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                                                    }
                                                ],
                                            },
                                        }
                                    ]
                                }
                            ],
                        }
                    ],
                    "clusters": [
                        {
                            "name": "backend",
                            "type": "STATIC",
                            "connect_timeout": "1s",
                            "load_assignment": {
                                "cluster_name": "backend",
                                "endpoints": [
                                    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}
                                ],
                            },
                        }
                    ],
                },
            }
        )
    )


def dp_conf(path, listen, upstream, routes=1):
    rules = []
    for i in range(routes - 1):
        rules.append(
            f"  - matches: [{{path: {{type: PathPrefix, value: /svc{i}}}}}]\n"
            f"    backendRefs: [{{group: ferrum.dev, kind: Backend, name: backend}}]\n"
        )
    rules.append("  - backendRefs: [{group: ferrum.dev, kind: Backend, name: backend}]\n")
    path.write_text(
        f"""apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: bench}}
spec:
  gatewayClassName: ferrum
  addresses: [{{type: IPAddress, value: 127.0.0.1}}]
  listeners: [{{name: http, port: {listen}, protocol: HTTP}}, {{name: tcp, port: {listen + TCP_OFFSET}, protocol: TCP}}]
---
apiVersion: ferrum.dev/v1alpha1
kind: Backend
metadata: {{name: backend}}
spec:
  endpoints: [{{address: 127.0.0.1, port: {upstream}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: bench}}
spec:
  parentRefs: [{{name: bench, sectionName: http}}]
  rules:
{''.join(rules)}---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {{name: bench-tcp}}
spec:
  parentRefs: [{{name: bench, sectionName: tcp}}]
  rules: [{{backendRefs: [{{group: ferrum.dev, kind: Backend, name: backend}}]}}]
"""
    )


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port, path, args):
    out = subprocess.run(
        ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        lat[pct] = float(m.group(1)) * UNITS[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "requests": total,
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def h2load(port, args):
    n = args.h2_requests
    out = subprocess.run(
        ["h2load", "-n", str(n), "-c", str(args.connections), "-m", "10", "-t", str(args.threads), f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    m = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    ok = int(re.search(r"(\d+) succeeded", out).group(1))
    return {
        "rps": rps,
        "requests": ok,
        "mean_ms": float(m.group(5)) * UNITS[m.group(6)],
        "max_ms": float(m.group(3)) * UNITS[m.group(4)],
        "succeeded": ok,
        "requested": n,
    }


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def summarize(runs):
    keys = runs[0].keys()
    return {k: median([r[k] for r in runs]) for k in keys if isinstance(runs[0][k], (int, float))}


def rss_mb(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main():
    global WORK, DP
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--h2-requests", type=int, default=200000)
    ap.add_argument("--envoy", default=shutil.which("envoy") or "/var/tmp/ferrum-bench-venv/bin/envoy")
    ap.add_argument("--profile", action="store_true", help="perf record ferrum-dp during one extra run")
    ap.add_argument("--dp", default=str(DP), help="the ferrum-dp binary (default: the release build)")
    ap.add_argument("--floor", default=str(TARGET_DIR / "release" / "examples" / "http_floor"), help="the floor's binary (HTTP/1.1 only; left out when absent)")
    ap.add_argument("--smoke", action="store_true", help="one short round, nothing written: the result as JSON on the last line (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.h2_requests = 1, 1, 5000
    DP = Path(args.dp)

    WORK = Path(tempfile.mkdtemp(prefix="ferrum-bench-"))
    (WORK / "tmp").mkdir()
    procs = Procs()
    try:
        nginx_conf(WORK / "backend.conf", BACKEND, body=BODY)
        procs.start("backend", ["nginx", "-c", str(WORK / "backend.conf"), "-e", str(WORK / "backend-error.log")])
        nginx_conf(WORK / "proxy.conf", PORTS["nginx"], upstream=BACKEND)
        procs.start("nginx", ["nginx", "-c", str(WORK / "proxy.conf"), "-e", str(WORK / "proxy-error.log")])
        haproxy_conf(WORK / "haproxy.cfg", PORTS["haproxy"], BACKEND)
        haproxy = procs.start("haproxy", ["haproxy", "-f", str(WORK / "haproxy.cfg"), "-db"])
        envoy_conf(WORK / "envoy.json", PORTS["envoy"], BACKEND)
        envoy = procs.start("envoy", [args.envoy, "-c", str(WORK / "envoy.json"), "--concurrency", "2", "--log-level", "error"])
        dp_conf(WORK / "dp.yaml", PORTS["ferrum-dp"], BACKEND)
        dp = procs.start("ferrum-dp", [str(DP), "--config", str(WORK / "dp.yaml"), "--admin-addr", "127.0.0.1:18900"], env={**os.environ, "RUST_LOG": "warn"})
        for p in [BACKEND, *PORTS.values(), *(v + TCP_OFFSET for v in PORTS.values())]:
            wait_port(p)

        targets = {"direct": DIRECT, **PORTS}
        pids = {"ferrum-dp": dp.pid, "nginx": procs.pid("nginx"), "haproxy": haproxy.pid, "envoy": envoy.pid}
        if Path(args.floor).exists():
            floor = procs.start("floor", [args.floor, f"127.0.0.1:{FLOOR}", f"127.0.0.1:{BACKEND}", "2"])
            wait_port(FLOOR)
            targets["floor"], pids["floor"] = FLOOR, floor.pid

        def measured(t, run):
            """Runs the load and adds the proxy's CPU per request (µs)."""
            before = cpu_seconds(pids[t]) if t in pids else None
            res = run()
            if before is not None and res["requests"]:
                res["cpu_us_per_req"] = (cpu_seconds(pids[t]) - before) * 1e6 / res["requests"]
            return res

        def interleaved(label, ports, run, show):
            """Warms each target up, then `args.rounds` rounds over all of them in turn."""
            for port in ports.values():
                subprocess.run(["wrk", "-t1", "-c10", "-d1s", f"http://127.0.0.1:{port}/"], capture_output=True)
            out = {t: [] for t in ports}
            for r in range(args.rounds):
                for t, port in ports.items():
                    res = measured(t, lambda: run(port))
                    out[t].append(res)
                    cpu = f"  cpu {res['cpu_us_per_req']:.1f} us/req" if "cpu_us_per_req" in res else ""
                    print(f"  {label} round {r + 1} {t:10} {res['rps']:>10.0f} rps  {show(res)}{cpu}", flush=True)
            return out

        latency = lambda res: f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms"
        h1 = interleaved("h1", targets, lambda port: wrk(port, "/", args), latency)
        targets.pop("floor", None)
        h2_ports = {"direct": DIRECT + 100, "ferrum-dp": PORTS["ferrum-dp"], "nginx": PORTS["nginx"] + 100, "haproxy": PORTS["haproxy"] + 100, "envoy": PORTS["envoy"]}
        h2 = interleaved(
            "h2",
            h2_ports,
            lambda port: h2load(port, args),
            lambda res: f"mean {res['mean_ms']:.3f} ms  ok {res['succeeded']}/{res['requested']}",
        )
        # TCP proxies: the same HTTP/1.1 load, relayed as bytes (a new upstream connection per
        # client connection; wrk keeps its connections).
        tcp_ports = {"direct": DIRECT, **{t: p + TCP_OFFSET for t, p in PORTS.items()}}
        tcp = interleaved("tcp", tcp_ports, lambda port: wrk(port, "/", args), latency)
        # After every load, as a user would see it.
        rss = {t: rss_mb(pids[t]) for t in PROXIES}

        # Scale: the same proxy with 10 and 10,000 routes; requests match the last-listed rule.
        procs.stop(dp)
        scale = {}
        for n in (10, 10000):
            dp_conf(WORK / f"dp{n}.yaml", PORTS["ferrum-dp"], BACKEND, routes=n)
        runs = {10: [], 10000: []}
        for r in range(args.rounds):
            # Alternated: whichever runs second in a round meets the first's closed connections.
            for n in (10, 10000) if r % 2 == 0 else (10000, 10):
                p = procs.start(f"dp{n}", [str(DP), "--config", str(WORK / f"dp{n}.yaml"), "--admin-addr", "127.0.0.1:18900"], env={**os.environ, "RUST_LOG": "warn"})
                wait_port(PORTS["ferrum-dp"])
                path = f"/svc{n - 2}/item"
                subprocess.run(["wrk", "-t1", "-c10", "-d1s", f"http://127.0.0.1:{PORTS['ferrum-dp']}{path}"], capture_output=True)
                res = wrk(PORTS["ferrum-dp"], path, args)
                runs[n].append(res)
                print(f"  scale round {r + 1} {n:>5} routes {res['rps']:>10.0f} rps  p99 {res['p99_ms']:.3f} ms", flush=True)
                procs.stop(p)
                time.sleep(0.3)
        scale = {str(n): summarize(v) for n, v in runs.items()}

        profile = None
        if args.profile and shutil.which("perf"):
            p = procs.start("dp-prof", [str(DP), "--config", str(WORK / "dp.yaml"), "--admin-addr", "127.0.0.1:18900"], env={**os.environ, "RUST_LOG": "warn"})
            wait_port(PORTS["ferrum-dp"])
            rec = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(p.pid), "-o", str(WORK / "perf.data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wrk(PORTS["ferrum-dp"], "/", args)
            rec.send_signal(signal.SIGINT)
            rec.wait()
            report = subprocess.run(["perf", "report", "-i", str(WORK / "perf.data"), "--no-children", "--percent-limit", "1.5", "--stdio", "-g", "none"], capture_output=True, text=True).stdout
            profile = [l for l in report.splitlines() if l.strip() and not l.startswith("#")][:40]
            procs.stop(p)
    finally:
        procs.stop_all()

    s1 = {t: summarize(v) for t, v in h1.items()}
    s2 = {t: summarize(v) for t, v in h2.items()}
    s3 = {t: summarize(v) for t, v in tcp.items()}
    ratio = lambda a, b: round(a / b, 3) if b else None
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cores": os.cpu_count(), "kernel": os.uname().release},
        "settings": vars(args),
        "http1": s1,
        "http2": s2,
        "tcp": s3,
        "ratios": {
            "h1_rps_dp_over_direct": ratio(s1["ferrum-dp"]["rps"], s1["direct"]["rps"]),
            "h1_rps_dp_over_nginx": ratio(s1["ferrum-dp"]["rps"], s1["nginx"]["rps"]),
            "h1_rps_dp_over_haproxy": ratio(s1["ferrum-dp"]["rps"], s1["haproxy"]["rps"]),
            "h1_rps_dp_over_envoy": ratio(s1["ferrum-dp"]["rps"], s1["envoy"]["rps"]),
            "h1_p99_dp_over_nginx": ratio(s1["ferrum-dp"]["p99_ms"], s1["nginx"]["p99_ms"]),
            "h1_p99_dp_over_haproxy": ratio(s1["ferrum-dp"]["p99_ms"], s1["haproxy"]["p99_ms"]),
            "h1_p99_dp_over_envoy": ratio(s1["ferrum-dp"]["p99_ms"], s1["envoy"]["p99_ms"]),
            "h2_rps_dp_over_nginx": ratio(s2["ferrum-dp"]["rps"], s2["nginx"]["rps"]),
            "h2_rps_dp_over_haproxy": ratio(s2["ferrum-dp"]["rps"], s2["haproxy"]["rps"]),
            "h2_rps_dp_over_envoy": ratio(s2["ferrum-dp"]["rps"], s2["envoy"]["rps"]),
            "tcp_rps_dp_over_direct": ratio(s3["ferrum-dp"]["rps"], s3["direct"]["rps"]),
            "tcp_rps_dp_over_nginx": ratio(s3["ferrum-dp"]["rps"], s3["nginx"]["rps"]),
            "tcp_rps_dp_over_haproxy": ratio(s3["ferrum-dp"]["rps"], s3["haproxy"]["rps"]),
            "tcp_rps_dp_over_envoy": ratio(s3["ferrum-dp"]["rps"], s3["envoy"]["rps"]),
            "scale_rps_10k_over_10": ratio(scale["10000"]["rps"], scale["10"]["rps"]),
        },
        # How far ferrum-dp's HTTP/1.1 is from the floor (not a proxy: see http_floor.rs).
        "floor": {
            "h1_rps_dp_over_floor": ratio(s1["ferrum-dp"]["rps"], s1["floor"]["rps"]),
            "h1_cpu_dp_over_floor": ratio(s1["ferrum-dp"]["cpu_us_per_req"], s1["floor"]["cpu_us_per_req"]),
            "h1_cpu_nginx_over_floor": ratio(s1["nginx"]["cpu_us_per_req"], s1["floor"]["cpu_us_per_req"]),
        }
        if "floor" in s1
        else None,
        "scale": scale,
        "rss_mb": rss,
        "profile_top": profile,
    }
    out = None
    if not args.smoke:
        out_dir = ROOT / "bench" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{result['when'].replace(':', '')}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"HTTP/1.1  wrk -t{args.threads} -c{args.connections} -d{args.duration}s, median of {args.rounds} interleaved rounds")
    cpu = lambda s: f"{s['cpu_us_per_req']:>12.1f}" if "cpu_us_per_req" in s else f"{'-':>12}"
    print(f"{'target':12}{'RPS':>12}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/req':>12}")
    for t, s in s1.items():
        print(f"{t:12}{s['rps']:>12.0f}{s['p50_ms']:>10.3f}{s['p99_ms']:>10.3f}{cpu(s)}")
    print(f"\nHTTP/2 (h2c)  h2load -c{args.connections} -m10 -n{args.h2_requests}")
    print(f"{'target':12}{'RPS':>12}{'mean ms':>10}{'max ms':>10}{'CPU us/req':>12}")
    for t, s in s2.items():
        print(f"{t:12}{s['rps']:>12.0f}{s['mean_ms']:>10.3f}{s['max_ms']:>10.3f}{cpu(s)}")
    print(f"\nTCP proxy (TCPRoute, nginx stream, HAProxy mode tcp, Envoy tcp_proxy), the HTTP/1.1 load above")
    print(f"{'target':12}{'RPS':>12}{'p50 ms':>10}{'p99 ms':>10}{'CPU us/req':>12}")
    for t, s in s3.items():
        print(f"{t:12}{s['rps']:>12.0f}{s['p50_ms']:>10.3f}{s['p99_ms']:>10.3f}{cpu(s)}")
    print(f"\nscale: 10 routes {scale['10']['rps']:.0f} rps, 10,000 routes {scale['10000']['rps']:.0f} rps")
    print("\nratios:")
    for k, v in {**result["ratios"], **(result["floor"] or {})}.items():
        print(f"  {k:28} {v}")
    print(f"\nRSS MB: {rss}")
    if profile:
        print("\nprofile (perf, self time):")
        print("\n".join(profile))
    if out:
        print(f"\nwritten to {out.relative_to(ROOT)}")
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
