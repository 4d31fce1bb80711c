//! The benchmark harnesses stay working: each runs briefly, at a small scale (`--smoke`), and
//! reports what `make bench`, `make bench-instructions`, `make bench-ca`, `make bench-xds`, `make bench-operator` and
//! `make bench-operator-mesh` report.

use std::sync::Mutex;

use ferrum_e2e::{venv_bin, workspace_bin};
use serde_json::Value;

/// bench.py and instructions.sh listen on the same fixed ports: one at a time.
static FIXED_PORTS: Mutex<()> = Mutex::new(());

/// This build's example `name` (cargo builds the examples for the tests).
fn example_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    assert!(bin.exists(), "{} is not built", bin.display());
    bin
}

/// Runs example `name` with `args` and `--smoke`; returns its report (the output's last line).
fn smoke(name: &str, args: &[&str]) -> Value {
    let bin = example_bin(name);
    let out = std::process::Command::new(&bin)
        .args(args)
        .arg("--smoke")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn bench_ca_signs_every_csr() {
    let r = smoke("bench_ca", &[]);
    assert_eq!((r["csrs"].as_u64(), r["failed"].as_u64()), (Some(100), Some(0)), "{r}");
    assert!(r["csrs_per_second"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["operator_cpu_ms_per_csr"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn bench_xds_measures_propagation_over_both_protocols() {
    for mode in ["sotw", "delta"] {
        let r = smoke("bench_xds", &[mode]);
        assert_eq!(
            (r["services"].as_u64(), r["clients"].as_u64()),
            (Some(50), Some(20)),
            "{r}"
        );
        let p = &r["propagation_ms"];
        assert_eq!(
            p["samples"].as_u64(),
            Some(20 * r["changes"].as_u64().unwrap()),
            "{mode}: {r}"
        );
        assert!(p["p99"].as_f64().unwrap() >= p["p50"].as_f64().unwrap(), "{r}");
        assert!(r["operator_rss_mib"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn bench_operator_measures_translation_and_propagation_for_gateways_and_the_mesh() {
    for (args, proxies) in [(&[][..], 1), (&["--mesh"][..], 10)] {
        let r = smoke("bench_operator", args);
        assert_eq!(r["proxies"].as_u64(), Some(proxies), "{r}");
        let p = &r["propagation_ms"];
        assert_eq!(
            p["samples"].as_u64(),
            Some(proxies * r["changes"].as_u64().unwrap()),
            "{r}"
        );
        assert!(r["full_translate_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{r}");
        assert!(r["operator_rss_mib"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// `make bench`: one short round of every load through ferrum-dp (this build's), nginx, HAProxy
/// and Envoy in front of one nginx backend, and of HTTP/1.1 through the floor.
#[test]
fn bench_py_compares_ferrum_dp_with_every_proxy() {
    let _turn = FIXED_PORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/bench.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("--smoke")
        .arg("--dp")
        .arg(workspace_bin("ferrum-dp"))
        .arg("--envoy")
        .arg(venv_bin("envoy"))
        .arg("--floor")
        .arg(example_bin("http_floor"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    for load in ["http1", "http2", "tcp"] {
        for proxy in ["direct", "ferrum-dp", "nginx", "haproxy", "envoy"] {
            let s = &r[load][proxy];
            assert!(s["rps"].as_f64().is_some_and(|v| v > 0.0), "{load} {proxy}: {s}");
        }
        assert!(
            r[load]["ferrum-dp"]["cpu_us_per_req"].as_f64().is_some_and(|v| v > 0.0),
            "{load}: {r}"
        );
    }
    for proxy in ["ferrum-dp", "nginx", "haproxy", "envoy"] {
        let s = &r["http2"][proxy];
        assert_eq!(s["succeeded"], s["requested"], "every h2c request through {proxy}: {s}");
        assert!(r["rss_mb"][proxy].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }
    assert!(
        r["ratios"]["scale_rps_10k_over_10"].as_f64().is_some_and(|v| v > 0.0),
        "{r}"
    );
    // The floor carried the HTTP/1.1 load, and ferrum-dp is measured against it.
    assert!(r["http1"]["floor"]["rps"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    for k in [
        "h1_rps_dp_over_floor",
        "h1_cpu_dp_over_floor",
        "h1_cpu_nginx_over_floor",
    ] {
        assert!(r["floor"][k].as_f64().is_some_and(|v| v > 0.0), "{k}: {r}");
    }
}

/// `make bench-instructions`: callgrind counts what this build's ferrum-dp executes per request,
/// over h2c and HTTP/1.1, and what nginx and the floor execute for the same HTTP/1.1 load.
#[test]
fn bench_instructions_counts_both_protocols() {
    let _turn = FIXED_PORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let work = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/instructions.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .env("DP", workspace_bin("ferrum-dp"))
        .env("FLOOR", example_bin("http_floor"))
        .env("N", "100")
        .env("WARMUP", "100")
        .env("WORK", work.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    // ferrum-dp over both, then the same HTTP/1.1 load through nginx and the floor.
    for load in ["h2c", "http1", "nginx http1", "floor http1"] {
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{load}: ")))
            .and_then(|l| l.strip_suffix(" instructions per request"))
            .and_then(|n| n.parse::<u64>().ok());
        assert!(count.is_some_and(|n| n > 1_000), "{load}: {text}");
    }
}
