//! `make bench-mesh`: pod to pod, direct vs through two `ferrum-dp` sidecars over HBONE, in
//! network namespaces (as root), interleaved round by round in one run.
//!
//! Pods A → B are in the mesh (capture rules, sidecars, certificates from the operator's CA; A
//! calls B's Service VIP); pods C → D are plain (no capture, no proxy; C calls D's IP). B and D
//! run the same nginx, A and C the same wrk (keep-alive HTTP/1.1). Reports RPS, p50, p99, the
//! HBONE/direct RPS ratio, each sidecar's CPU per 1,000 RPS (and how much of it is the kernel's)
//! and its RSS. Pods E → F have sidecars too, but F is not HBONE-capable: E's sidecar connects
//! in plain TCP, F's captures it — what an Istio sidecar pair without mTLS does — to show what
//! HBONE itself costs beyond the two proxy hops. Writes
//! bench/results/mesh-<time>.json. `--smoke` runs one short round (the tests do, to keep the
//! harness working). `--pin` puts the clients and servers on CPU 0 and the four sidecars on
//! CPU 1, so the proxies do not compete with the application for the same core.
//! `--http-routing-always` applies the MeshConfig `httpRouting: Always` first: the client
//! sidecars then serve svc-b's and svc-f's HTTP request by request (routed, as Istio's do)
//! instead of relaying connections — with `FERRUM_REQUEST_METRICS=true` in the environment,
//! each call is counted on both sides.

use std::time::Duration;

use ferrum_e2e::mesh::World;
use ferrum_e2e::*;
use serde_json::json;

const VIP: &str = "10.96.77.20";
const PLAIN_VIP: &str = "10.96.77.21";

/// wrk's latency figure (`1.23ms`, `850.00us`, `1.02s`) in milliseconds.
fn ms(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v / 1000.0,
        "s" => v * 1000.0,
        _ => v,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50: f64,
    p99: f64,
    errors: u64,
}

fn parse_wrk(out: &str) -> Run {
    let mut r = Run::default();
    for l in out.lines().map(str::trim) {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50 = ms(v),
            ["99%", v] => r.p99 = ms(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    r
}

/// `--pin`: clients and servers on CPU 0, the sidecars on CPU 1 — each proxy with a CPU of its
/// own, as where the proxies do not compete with the application for the same cores.
fn pinned() -> bool {
    std::env::args().any(|a| a == "--pin")
}

/// `args`, run on CPU 0 when pinning.
fn on_app_cpu<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let pin: &[&str] = if pinned() { &["taskset", "-c", "0"] } else { &[] };
    pin.iter().chain(args).copied().collect()
}

fn nginx(w: &World, i: usize) -> Proc {
    let p = &w.pods[i];
    let conf = w.dir.path().join(format!("nginx-{}.conf", p.name));
    std::fs::write(
        &conf,
        format!(
            "master_process off;\npid {dir}/nginx-{n}.pid;\nerror_log stderr crit;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
             server {{ listen 8080 reuseport backlog=4096; keepalive_requests 1000000; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            dir = w.dir.path().display(),
            n = p.name
        ),
    )
    .unwrap();
    let child =
        p.ns.cmd(&on_app_cpu(&[
            "nginx",
            "-c",
            conf.to_str().unwrap(),
            "-g",
            "daemon off;",
        ]))
        .spawn()
        .expect("nginx (make bench-mesh installs it)");
    Proc(child)
}

fn wrk(w: &World, i: usize, url: &str, secs: u64, conns: u32) -> Run {
    let out = w.pods[i]
        .ns
        .cmd(&on_app_cpu(&[
            "wrk",
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ]))
        .output()
        .expect("wrk (make bench-mesh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let r = parse_wrk(&text);
    if r.rps == 0.0 || r.errors > 0 {
        eprintln!("wrk {url}: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    r
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// One proxied path: who calls what, through which two sidecars, and what it measured.
struct Path {
    name: &'static str,
    client: usize,
    url: String,
    sidecars: [u32; 2],
    /// With the node agent's eBPF (attached, and the client pod enrolled, for this path's
    /// rounds only): both sidecar ↔ app hops redirected socket to socket.
    ebpf: bool,
    runs: Vec<Run>,
    /// Per round: vCPU per 1,000 RPS of each sidecar, and the share of it spent in the kernel.
    cpu: Vec<[f64; 2]>,
    kernel: Vec<[f64; 2]>,
}

impl Path {
    fn new(name: &'static str, client: usize, url: String, sidecars: [u32; 2], ebpf: bool) -> Path {
        Path {
            name,
            client,
            url,
            sidecars,
            ebpf,
            runs: Vec::new(),
            cpu: Vec::new(),
            kernel: Vec::new(),
        }
    }

    fn round(&mut self, w: &World, round: usize, secs: u64, conns: u32) {
        if self.ebpf {
            node_agent(&["attach"]);
            let netns = w.pods[self.client].ns.path();
            node_agent(&["enroll", "--netns", netns.to_str().unwrap()]);
        }
        let before = self.sidecars.map(cpu_split);
        let r = wrk(w, self.client, &self.url, secs, conns);
        let after = self.sidecars.map(cpu_split);
        if self.ebpf {
            print!("{}", node_agent(&["stats"]));
            node_agent(&["detach", "--drain-seconds", "5"]);
        }
        let used = [0, 1].map(|i| (after[i].0 - before[i].0, after[i].1 - before[i].1));
        println!(
            "round {round} {}: {r:?} sidecar (user, system) cpu-seconds {used:?}",
            self.name
        );
        // vCPU per 1,000 RPS: CPU seconds per second, per thousand requests per second.
        self.cpu
            .push(used.map(|(u, k)| (u + k) / secs as f64 / (r.rps / 1000.0)));
        self.kernel.push(used.map(|(u, k)| k / (u + k).max(f64::EPSILON)));
        self.runs.push(r);
    }

    fn best(&self) -> Run {
        best(&self.runs)
    }

    /// The least CPU per 1,000 RPS of each sidecar over the rounds, with that round's kernel share.
    fn cpu_min(&self) -> [(f64, f64); 2] {
        [0, 1].map(|i| {
            (0..self.cpu.len())
                .map(|r| (self.cpu[r][i], self.kernel[r][i]))
                .fold((f64::INFINITY, 0.0), |m, c| if c.0 < m.0 { c } else { m })
        })
    }
}

/// Whether the sidecar of pod `i` has routed a request by a Service's route.
fn routes(w: &World, i: usize) -> bool {
    let out = w.pods[i].run(&["curl", "-sS", "http://127.0.0.1:15000/metrics"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .any(|l| l.starts_with("ferrum_route_requests_total{route=\"service/") && !l.ends_with(" 0"))
}

/// Runs `ferrum-node-agent <args>` on the bench's own pin directory; its output.
fn node_agent(args: &[&str]) -> String {
    ferrum_e2e::node_agent(std::path::Path::new("/sys/fs/bpf/ferrum-bench-mesh"), args)
}

fn best(v: &[Run]) -> Run {
    v.iter()
        .copied()
        .fold(Run::default(), |m, r| if r.rps > m.rps { r } else { m })
}

/// The six pods, their two Services, nginx on B, D and F, and ready sidecars on A, B, E and F
/// (on CPU 1 when pinning); returns the pods' indices `[a, b, c, d, e, f]` and the servers.
async fn pods(w: &mut World) -> ([usize; 6], (Proc, Proc, Proc)) {
    let (a, b) = (w.pod("a-1", "sa-a", "a", 10, true), w.pod("b-1", "sa-b", "b", 11, true));
    let (c, d) = (
        w.pod("c-1", "sa-c", "c", 12, false),
        w.pod("d-1", "sa-d", "d", 13, false),
    );
    // E → F: sidecars on both, but F is not labelled as speaking HBONE, so E's sidecar connects
    // in plain TCP and F's captures it on 15006 (PERMISSIVE) — Istio's sidecar model without mTLS.
    let (e, f) = (
        w.pod("e-1", "sa-e", "e", 14, false),
        w.pod("f-1", "sa-f", "f", 15, false),
    );
    for i in [e, f] {
        w.pods[i]
            .ns
            .exec(&[workspace_bin("ferrum-dp").to_str().unwrap(), "init-iptables"]);
    }
    w.service("svc-b", VIP, "b");
    w.service("svc-f", PLAIN_VIP, "f");
    let servers = (nginx(w, b), nginx(w, d), nginx(w, f));
    for (i, sa) in [(a, "sa-a"), (b, "sa-b"), (e, "sa-e"), (f, "sa-f")] {
        w.sidecar(i, sa, &[]);
    }
    for i in [a, b, e, f] {
        w.ready(i).await;
    }
    if pinned() {
        for i in [a, b, e, f] {
            let pid = w.pods[i].sidecar.as_ref().unwrap().0.id().to_string();
            let ok = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", "1", &pid])
                .output();
            assert!(ok.is_ok_and(|o| o.status.success()), "taskset the sidecar of pod {i}");
        }
    }
    ([a, b, c, d, e, f], servers)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let smoke = smoke();
    let rounds: usize = arg("--rounds").map_or(if smoke { 1 } else { 3 }, |v| v.parse().unwrap());
    let secs: u64 = arg("--duration").map_or(if smoke { 1 } else { 10 }, |v| v.parse().unwrap());
    let conns: u32 = arg("--connections").map_or(16, |v| v.parse().unwrap());

    let mut w = World::start(&[]).await;
    let ([a, b, c, d, e, f], _servers) = pods(&mut w).await;
    let routed = std::env::args().any(|a| a == "--http-routing-always");
    if routed {
        w.cluster.apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ferrum-system}\n---\n\
             apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: ferrum-system}\nspec: {httpRouting: Always}\n",
        );
    }
    let direct_url = format!("http://{}:8080/", w.pods[d].ip);
    let sidecars = |x: usize, y: usize| [x, y].map(|i| w.pods[i].sidecar.as_ref().unwrap().0.id());
    let mut paths = [
        Path::new("hbone", a, format!("http://{VIP}/"), sidecars(a, b), false),
        Path::new("plain", e, format!("http://{PLAIN_VIP}/"), sidecars(e, f), false),
        Path::new("hbone+ebpf", a, format!("http://{VIP}/"), sidecars(a, b), true),
    ];
    for p in &paths {
        eventually(
            &format!("{} reaches its Service", p.name),
            Duration::from_secs(20),
            async || wrk(&w, p.client, &p.url, 1, 1).rps > 0.0 && (!routed || routes(&w, p.client)),
        )
        .await;
    }

    let mut direct = Vec::new();
    for round in 0..rounds {
        let r = wrk(&w, c, &direct_url, secs, conns);
        println!("round {round} direct: {r:?}");
        direct.push(r);
        for p in &mut paths {
            p.round(&w, round, secs, conns);
        }
    }
    report(&direct, &paths, rounds, secs, conns);
}

/// The Markdown table: each path's best round against the best direct one.
fn print_table(d_best: Run, [hbone, plain, accelerated]: &[Path; 3]) {
    println!();
    println!("| path | RPS | / direct | p50 ms | p99 ms | sidecar vCPU per 1k RPS (client, server) | in kernel |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| direct (C → D) | {:.0} | 1.00 | {:.2} | {:.2} | — | — |",
        d_best.rps, d_best.p50, d_best.p99
    );
    for (name, p) in [
        ("two sidecars, HBONE (A → svc-b → B)", hbone),
        ("the same, node agent's eBPF on both app ↔ sidecar hops", accelerated),
        ("two sidecars, plain TCP (E → svc-f → F)", plain),
    ] {
        let (r, [(cc, ck), (sc, sk)]) = (p.best(), p.cpu_min());
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {cc:.3}, {sc:.3} | {:.0}%, {:.0}% |",
            r.rps,
            r.rps / d_best.rps,
            r.p50,
            r.p99,
            ck * 100.0,
            sk * 100.0
        );
    }
}

fn report(direct: &[Run], paths: &[Path; 3], rounds: usize, secs: u64, conns: u32) {
    let d_best = best(direct);
    let [hbone, plain, accelerated] = paths;
    let (m_best, p_best) = (hbone.best(), plain.best());
    let rss = hbone.sidecars.map(rss_mib);
    let [(cc, ck), (sc, sk)] = hbone.cpu_min();
    let [(pcc, _), (psc, _)] = plain.cpu_min();
    let e_best = accelerated.best();
    let [(ecc, _), (esc, _)] = accelerated.cpu_min();
    let errors: u64 = direct
        .iter()
        .chain(paths.iter().flat_map(|p| &p.runs))
        .map(|r| r.errors)
        .sum();
    print_table(d_best, paths);
    println!();
    println!(
        "HBONE / direct RPS: {:.2} (target ≥ 0.70); HBONE / plain-TCP sidecars: {:.2}; errors: {errors}",
        m_best.rps / d_best.rps,
        m_best.rps / p_best.rps
    );
    println!(
        "with the node agent's eBPF: HBONE / direct RPS {:.2}",
        e_best.rps / d_best.rps
    );
    println!(
        "sidecar vCPU per 1,000 RPS: client {cc:.3}, server {sc:.3} (target ≤ 0.10); RSS MiB: client {:.1}, server {:.1} (target ≤ 20)",
        rss[0], rss[1]
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let result = json!({
        "cores": cores, "rounds": rounds, "duration_s": secs, "connections": conns, "pinned": pinned(),
        "http_routing_always": std::env::args().any(|a| a == "--http-routing-always"),
        "request_metrics": std::env::var("FERRUM_REQUEST_METRICS").is_ok_and(|v| v == "true"),
        "direct": {"rps": d_best.rps, "p50_ms": d_best.p50, "p99_ms": d_best.p99},
        "hbone": {"rps": m_best.rps, "p50_ms": m_best.p50, "p99_ms": m_best.p99},
        "plain_sidecars": {"rps": p_best.rps, "p50_ms": p_best.p50, "p99_ms": p_best.p99,
            "sidecar_vcpu_per_1000_rps": {"client": pcc, "server": psc}},
        "ratio": m_best.rps / d_best.rps,
        "hbone_ebpf": {"rps": e_best.rps, "p50_ms": e_best.p50, "p99_ms": e_best.p99,
            "ratio": e_best.rps / d_best.rps,
            "sidecar_vcpu_per_1000_rps": {"client": ecc, "server": esc}},
        "hbone_vs_plain_sidecars": m_best.rps / p_best.rps,
        "sidecar_vcpu_per_1000_rps": {"client": cc, "server": sc},
        "sidecar_kernel_share": {"client": ck, "server": sk},
        "sidecar_rss_mib": {"client": rss[0], "server": rss[1]},
        "errors": errors,
    });
    publish("mesh", &result);
}
