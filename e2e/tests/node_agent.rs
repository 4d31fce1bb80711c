//! The node agent's sockmap redirection under real sidecars (network-namespace pods, as root):
//! with the agent attached and pod A enrolled, A's connects to B's Service go straight to A's
//! sidecar (which still learns the VIP they were meant for), B's sidecar delivers to B's app
//! from 127.0.0.6, and on both hops the bytes are queued straight onto the peer socket — HTTP
//! and raw TCP (with a half-close) answer exactly as without it — and detaching leaves the pods
//! talking over TCP again. Also `make
//! bench-mesh`'s harness, which attaches the agent for a path of its own. Their own test binary,
//! one test at a time: the programs see every socket on the machine, and detaching waits for
//! (or, past its drain, drops bytes queued to) sockets of every pod.

use std::path::PathBuf;
use std::time::Duration;

use ferrum_e2e::mesh::{NS, World};
use ferrum_e2e::*;

const VIP: &str = "10.96.77.30";

/// One test at a time (the async test holds it across awaits, hence tokio's).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Agent(PathBuf);

impl Agent {
    fn attach() -> Agent {
        let agent = Agent(PathBuf::from(format!("/sys/fs/bpf/ferrum-e2e-{}", std::process::id())));
        agent.run(&["attach"]);
        agent
    }

    fn run(&self, args: &[&str]) -> String {
        node_agent(&self.0, args)
    }

    /// A counter of `stats` ("paired", "redirected", "passed", "connects").
    fn count(&self, name: &str) -> u64 {
        let stats = self.run(&["stats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        node_agent(&self.0, &["detach"]);
    }
}

fn curl_svc_b(w: &World, path: &str) -> (bool, String) {
    w.pods[0].curl(&[
        "--resolve",
        &format!("svc-b.{NS}.svc:80:{VIP}"),
        &format!("http://svc-b.{NS}.svc{path}"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sidecar_app_hops_are_redirected_and_answer_alike() {
    let _turn = TURN.lock().await;
    let agent = Agent::attach();
    let mut w = World::start(&[]).await;
    let a = w.pod("a-1", "sa-a", "a", 10, true);
    let b = w.pod("b-1", "sa-b", "b", 11, true);
    w.service("svc-b", VIP, "b");
    w.app(b);
    w.sidecar(a, "sa-a", &[]);
    w.sidecar(b, "sa-b", &[]);
    w.ready(a).await;
    w.ready(b).await;
    eventually("pod A reaches svc-b", Duration::from_secs(20), async || {
        curl_svc_b(&w, "/warmup").0
    })
    .await;

    let a_netns = w.pods[a].ns.path();
    agent.run(&["enroll", "--netns", a_netns.to_str().unwrap()]);
    let (paired, redirected) = (agent.count("paired"), agent.count("redirected"));
    let connects = agent.count("connects");
    for i in 0..20 {
        let (ok, body) = curl_svc_b(&w, &format!("/r-{i}"));
        assert!(ok, "{body}");
        assert_eq!(body.trim(), format!("hello from b-1: /r-{i} from 127.0.0.6"));
    }
    assert_eq!(w.pods[a].echo_bulk(VIP, "payload-5d1e"), "12000 payload-5d1e");
    // A's 21 connects went to its sidecar at connect(); each, and B's sidecar's connection to
    // its app, paired at both ends.
    assert_eq!(agent.count("connects") - connects, 21, "A's connects to the VIP");
    assert!(agent.count("paired") - paired >= 4 * 21, "connections were not paired");
    assert!(
        agent.count("redirected") - redirected >= 21 * 4,
        "requests and answers were not redirected"
    );

    agent.run(&["detach"]);
    let (ok, body) = curl_svc_b(&w, "/after-detach");
    assert!(ok && body.contains("/after-detach from 127.0.0.6"), "{body}");
    assert_eq!(w.pods[a].echo_bulk(VIP, "payload-after"), "13000 payload-after");
}

/// `make bench-mesh`'s harness, one short round: it runs and reports every path.
#[test]
fn bench_mesh_harness_runs() {
    let _turn = TURN.blocking_lock();
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("examples/bench_mesh");
    assert!(bin.exists(), "{} is not built", bin.display());
    let out = std::process::Command::new(&bin).arg("--smoke").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    for path in ["direct", "hbone", "hbone_ebpf", "plain_sidecars"] {
        assert!(last[path]["rps"].as_f64().unwrap() > 0.0, "{path}: {last}");
    }
    assert_eq!(last["errors"], 0, "{last}");
}
