//! `make bench-mesh`: pod to pod, direct vs through two `ferrum-dp` sidecars over HBONE, in
//! network namespaces (as root), interleaved round by round in one run.
//!
//! Pods A → B are in the mesh (capture rules, sidecars, certificates from the operator's CA; A
//! calls B's Service VIP); pods C → D are plain (no capture, no proxy; C calls D's IP). B and D
//! run the same nginx, A and C the same wrk (keep-alive HTTP/1.1). Reports RPS, p50, p99, the
//! HBONE/direct RPS ratio, each sidecar's CPU per 1,000 RPS and its RSS; writes
//! bench/results/mesh-<time>.json. `--smoke` runs one short round (the tests do, to keep the
//! harness working).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrum_e2e::mesh::World;
use ferrum_e2e::*;
use serde_json::json;

const VIP: &str = "10.96.77.20";

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
        p.ns.cmd(&["nginx", "-c", conf.to_str().unwrap(), "-g", "daemon off;"])
            .spawn()
            .expect("nginx (make bench-mesh installs it)");
    Proc(child)
}

fn wrk(w: &World, i: usize, url: &str, secs: u64, conns: u32) -> Run {
    let out = w.pods[i]
        .ns
        .cmd(&[
            "wrk",
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk (make bench-mesh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let r = parse_wrk(&text);
    if r.rps == 0.0 {
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let rounds: usize = arg("--rounds").map_or(if smoke { 1 } else { 3 }, |v| v.parse().unwrap());
    let secs: u64 = arg("--duration").map_or(if smoke { 1 } else { 10 }, |v| v.parse().unwrap());
    let conns: u32 = arg("--connections").map_or(16, |v| v.parse().unwrap());

    let mut w = World::start(&[]).await;
    let (a, b) = (w.pod("a-1", "sa-a", "a", 10, true), w.pod("b-1", "sa-b", "b", 11, true));
    let (c, d) = (
        w.pod("c-1", "sa-c", "c", 12, false),
        w.pod("d-1", "sa-d", "d", 13, false),
    );
    w.service("svc-b", VIP, "b");
    let _servers = (nginx(&w, b), nginx(&w, d));
    w.sidecar(a, "sa-a", &[]);
    w.sidecar(b, "sa-b", &[]);
    w.ready(a).await;
    w.ready(b).await;
    let mesh_url = format!("http://{VIP}/");
    let direct_url = format!("http://{}:8080/", w.pods[d].ip);
    eventually("A reaches svc-b", Duration::from_secs(20), async || {
        wrk(&w, a, &mesh_url, 1, 1).rps > 0.0
    })
    .await;
    let pids: Vec<u32> = [a, b]
        .iter()
        .map(|&i| w.pods[i].sidecar.as_ref().unwrap().0.id())
        .collect();

    let (mut direct, mut mesh, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let r = wrk(&w, c, &direct_url, secs, conns);
        println!("round {round} direct: {r:?}");
        direct.push(r);
        let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
        let r = wrk(&w, a, &mesh_url, secs, conns);
        let used: Vec<f64> = pids.iter().zip(&before).map(|(&p, b)| cpu_seconds(p) - b).collect();
        println!("round {round} hbone: {r:?} sidecar cpu-seconds {used:?}");
        // vCPU per 1,000 RPS: CPU seconds per second, per thousand requests per second.
        cpu.push(
            used.iter()
                .map(|u| u / secs as f64 / (r.rps / 1000.0))
                .collect::<Vec<f64>>(),
        );
        mesh.push(r);
    }
    let best = |v: &[Run]| {
        v.iter()
            .copied()
            .fold(Run::default(), |m, r| if r.rps > m.rps { r } else { m })
    };
    let (d_best, m_best) = (best(&direct), best(&mesh));
    let rss: Vec<f64> = pids.iter().map(|&p| rss_mib(p)).collect();
    let cpu_min: Vec<f64> = (0..2)
        .map(|i| cpu.iter().map(|c| c[i]).fold(f64::INFINITY, f64::min))
        .collect();
    let errors: u64 = direct.iter().chain(&mesh).map(|r| r.errors).sum();
    println!();
    println!("| path | RPS | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (name, r) in [
        ("direct (C → D)", d_best),
        ("two sidecars, HBONE (A → svc-b → B)", m_best),
    ] {
        println!("| {name} | {:.0} | {:.2} | {:.2} |", r.rps, r.p50, r.p99);
    }
    println!();
    println!(
        "HBONE / direct RPS: {:.2} (target ≥ 0.70); errors: {errors}",
        m_best.rps / d_best.rps
    );
    println!(
        "sidecar vCPU per 1,000 RPS: client {:.3}, server {:.3} (target ≤ 0.10); RSS MiB: client {:.1}, server {:.1} (target ≤ 20)",
        cpu_min[0], cpu_min[1], rss[0], rss[1]
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let result = json!({
        "cores": cores, "rounds": rounds, "duration_s": secs, "connections": conns,
        "direct": {"rps": d_best.rps, "p50_ms": d_best.p50, "p99_ms": d_best.p99},
        "hbone": {"rps": m_best.rps, "p50_ms": m_best.p50, "p99_ms": m_best.p99},
        "ratio": m_best.rps / d_best.rps,
        "sidecar_vcpu_per_1000_rps": {"client": cpu_min[0], "server": cpu_min[1]},
        "sidecar_rss_mib": {"client": rss[0], "server": rss[1]},
        "errors": errors,
    });
    if !smoke {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(
            dir.join(format!("mesh-{t}.json")),
            serde_json::to_vec_pretty(&result).unwrap(),
        );
    }
    println!("{result}");
}
