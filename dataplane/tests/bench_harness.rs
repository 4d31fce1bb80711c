//! The benchmark harnesses of this crate stay working: each runs briefly and reports.

#[test]
fn bench_policy_runs_and_reports_every_set() {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("examples/bench_policy");
    assert!(bin.exists(), "{} is not built", bin.display());
    let out = std::process::Command::new(&bin).arg("--smoke").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let sets = last["sets"].as_array().unwrap();
    let names: Vec<&str> = sets.iter().filter_map(|s| s["set"].as_str()).collect();
    assert_eq!(names, ["exact", "wildcards", "http"], "{last}");
    for s in sets {
        assert!(
            s["allow_ns"].as_f64().unwrap() > 0.0 && s["deny_ns"].as_f64().unwrap() > 0.0,
            "{s}"
        );
    }
}
