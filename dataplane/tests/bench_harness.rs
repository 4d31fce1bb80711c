//! The benchmark harnesses of this crate stay working: each runs briefly and reports.

#[test]
fn bench_policy_runs_and_reports_both_sets() {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("examples/bench_policy");
    assert!(bin.exists(), "{} is not built", bin.display());
    let out = std::process::Command::new(&bin).arg("--smoke").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let sets = last["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 2, "{last}");
    for s in sets {
        assert!(
            s["allow_ns"].as_f64().unwrap() > 0.0 && s["deny_ns"].as_f64().unwrap() > 0.0,
            "{s}"
        );
    }
}
