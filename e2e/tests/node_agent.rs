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
/// Pod A's index in [`World::a_calls_b`]'s world.
const A: usize = 0;

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

    /// A counter of `stats`, or None while nothing is attached.
    fn try_count(&self, name: &str) -> Option<u64> {
        let stats = try_node_agent(&self.0, &["stats"]).ok()?;
        stats.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    }

    /// A counter of `stats` ("paired", "redirected", "passed", "connects", "enrolled").
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

/// A Python client that GETs `path` from svc-b on a dual-stack IPv6 socket, as Java does, and
/// prints whom it is connected to and the body.
fn dual_stack_get(path: &str) -> String {
    format!(
        r#"
import socket
s = socket.socket(socket.AF_INET6)
s.settimeout(5)
s.connect(("::ffff:{VIP}", 80))
s.sendall(b"GET {path} HTTP/1.1\r\nHost: svc-b.{NS}.svc\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(s.getpeername()[0], data.decode().split("\r\n\r\n", 1)[1].strip())
"#
    )
}

fn curl_svc_b(w: &World, path: &str) -> (bool, String) {
    w.pods[A].curl_svc("svc-b", VIP, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sidecar_app_hops_are_redirected_and_answer_alike() {
    let _turn = TURN.lock().await;
    let agent = Agent::attach();
    let w = World::a_calls_b(&[VIP]).await;

    let a_netns = w.pods[A].ns.path();
    agent.run(&["enroll", "--netns", a_netns.to_str().unwrap()]);
    let (paired, redirected) = (agent.count("paired"), agent.count("redirected"));
    let connects = agent.count("connects");
    for i in 0..20 {
        let (ok, body) = curl_svc_b(&w, &format!("/r-{i}"));
        assert!(ok, "{body}");
        assert_eq!(body.trim(), format!("hello from b-1: /r-{i} from 127.0.0.6"));
    }
    assert_eq!(w.pods[A].echo_bulk(VIP, "payload-5d1e"), "12000 payload-5d1e");
    // Java's way: the IPv4 Service dialled on a dual-stack IPv6 socket (`::ffff:<VIP>`).
    let out = w.pods[A].run(&["python3", "-c", &dual_stack_get("/dual")]);
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.trim(),
        format!("::ffff:{VIP} hello from b-1: /dual from 127.0.0.6"),
        "the app sees the address it dialled and B's answer"
    );
    // A's 22 connects went to its sidecar at connect(), each paired at both ends, and so were
    // B's sidecar's connections to its app (at least the echo's: HTTP ones it may keep and
    // reuse across requests, some made during the warm-up).
    assert_eq!(agent.count("connects") - connects, 22, "A's connects to the VIP");
    let paired = agent.count("paired") - paired;
    assert!(paired >= 2 * 22 + 2, "connections were not paired: {paired}");
    // At least one write each way on both hops of every exchange: without B's hop redirected
    // too, A's alone would make about half.
    assert!(
        agent.count("redirected") - redirected >= 22 * 4,
        "requests and answers were not redirected"
    );

    agent.run(&["detach"]);
    let (ok, body) = curl_svc_b(&w, "/after-detach");
    assert!(ok && body.contains("/after-detach from 127.0.0.6"), "{body}");
    assert_eq!(w.pods[A].echo_bulk(VIP, "payload-after"), "13000 payload-after");
}

/// Dual-stack pods, A calling svc-b's IPv6 ClusterIP: A's connects go to its sidecar's `[::1]`
/// at connect(), B's sidecar reaches its app from `::6` socket to socket, and every answer is
/// what it is without the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_hops_are_redirected_too() {
    const VIP6: &str = "fd00:96::77:30";
    let _turn = TURN.lock().await;
    let agent = Agent::attach();
    let w = World::a_calls_b(&[VIP, VIP6]).await;
    let a = A;
    let curl6 = |path: &str| w.pods[a].curl_svc("svc-b", VIP6, path);

    agent.run(&["enroll", "--netns", w.pods[a].ns.path().to_str().unwrap()]);
    let (paired, redirected, connects) = (
        agent.count("paired"),
        agent.count("redirected"),
        agent.count("connects"),
    );
    for i in 0..5 {
        let (ok, body) = curl6(&format!("/v6-{i}"));
        assert!(ok, "{body}");
        assert_eq!(body.trim(), format!("hello from b-1: /v6-{i} from ::6"));
    }
    assert_eq!(w.pods[a].echo_bulk(VIP6, "v6-payload-71c2"), "15000 v6-payload-71c2");
    assert_eq!(agent.count("connects") - connects, 6, "A's connects to the IPv6 VIP");
    let paired = agent.count("paired") - paired;
    assert!(paired >= 2 * 6 + 2, "connections were not paired: {paired}");
    assert!(
        agent.count("redirected") - redirected >= 6 * 4,
        "requests and answers were not redirected"
    );
}

/// A kubelet-like cgroup `pod<uid>` holding every process in a pod's network namespace (as
/// the kubelet puts a pod's containers), under the cgroup2 root; undone on drop.
struct PodCgroup {
    root: PathBuf,
    dir: PathBuf,
}

impl PodCgroup {
    fn new(uid: &str, netns: &std::path::Path) -> PodCgroup {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let root = PathBuf::from(
            mounts
                .lines()
                .find_map(|l| {
                    l.split_whitespace()
                        .nth(2)
                        .filter(|t| *t == "cgroup2")
                        .and(l.split_whitespace().nth(1))
                })
                .expect("a cgroup2 mount"),
        );
        let dir = root.join(format!("ferrum-e2e-{}/pod{uid}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ino = |p: &std::path::Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let pod = ino(netns).unwrap();
        let mut moved = 0;
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let is_pid = e
                .file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
            if is_pid && ino(&e.path().join("ns/net")).is_ok_and(|i| i == pod) {
                moved +=
                    usize::from(std::fs::write(dir.join("cgroup.procs"), e.file_name().as_encoded_bytes()).is_ok());
            }
        }
        assert!(moved > 0, "no process in {}", netns.display());
        PodCgroup { root, dir }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for pid in std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir(self.dir.parent().unwrap());
    }
}

/// `ferrum-node-agent run` as the DaemonSet runs it, against the API emulator.
fn run_agent(w: &World, pin_dir: &std::path::Path, log: &std::path::Path, metrics: u16) -> Proc {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = std::process::Command::new(workspace_bin("ferrum-node-agent"))
        .arg("--pin-dir")
        .arg(pin_dir)
        .args([
            "run",
            "--node",
            "node-1",
            "--daemonset",
            "ferrum-system/ferrum-node-agent",
        ])
        .args(["--drain-seconds", "1", "--resync-seconds", "1"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .env("KUBECONFIG", &w.cluster.kubeconfig)
        .env("RUST_LOG", "info")
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// SIGTERM, as the kubelet stops a pod; the agent's exit status.
fn stop(mut agent: Proc) -> std::process::ExitStatus {
    let pid = agent.0.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    agent.0.wait().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemonset_agent_enrolls_injected_pods_and_detaches_only_on_uninstall() {
    let _turn = TURN.lock().await;
    let w = World::a_calls_b(&[VIP]).await;
    let uid = w.cluster.get("pod", NS, "a-1")["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let _cgroup = PodCgroup::new(&uid, &w.pods[A].ns.path());
    w.cluster.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ferrum-system}\n---\n\
         apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: ferrum-node-agent, namespace: ferrum-system}\n\
         spec: {selector: {matchLabels: {app: agent}}, template: {metadata: {labels: {app: agent}}, spec: {containers: [{name: agent, image: agent}]}}}\n",
    );
    // What the injector records: A's capture, with 9999 left alone.
    let capture = ferrum_snapshot::mesh::Capture {
        exclude_outbound: vec![9999],
        ..Default::default()
    };
    let status = serde_json::json!({"version": "0.1.0", "capture": capture}).to_string();
    w.cluster.kubectl(
        &[
            "annotate",
            "pod",
            "a-1",
            "-n",
            NS,
            &format!("ferrum.dev/status={status}"),
        ],
        None,
    );

    let agent = Agent(PathBuf::from(format!(
        "/sys/fs/bpf/ferrum-e2e-run-{}",
        std::process::id()
    )));
    let log = w.dir.path().join("agent.log");
    let metrics = free_port();
    let running = run_agent(&w, &agent.0, &log, metrics);
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let enrolled_becomes = async |n: u64, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while agent.try_count("enrolled") != Some(n) {
            assert!(
                std::time::Instant::now() < deadline,
                "not within 20 s: {what}\n{}",
                agent_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    enrolled_becomes(1, "pod A is enrolled").await;
    let connects = agent.count("connects");
    for i in 0..10 {
        let (ok, body) = curl_svc_b(&w, &format!("/run-{i}"));
        assert!(ok && body.contains(&format!("/run-{i} from 127.0.0.6")), "{body}");
    }
    assert_eq!(
        agent.count("connects") - connects,
        10,
        "A's connects went to its sidecar\n{}",
        agent_log()
    );
    // A port the recorded capture excludes is left alone, as the capture rules leave it.
    let excluded = format!(
        "import socket\ns = socket.socket(); s.settimeout(0.3)\ntry: s.connect(('{VIP}', 9999))\nexcept OSError: pass"
    );
    w.pods[A].run(&["python3", "-c", &excluded]);
    assert_eq!(
        agent.count("connects") - connects,
        10,
        "a connect to an excluded port was redirected"
    );
    // What Prometheus scrapes says the same.
    let scraped = get_text(&format!("http://127.0.0.1:{metrics}/metrics")).await;
    let value = |name: &str| -> u64 {
        let line = scraped
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {scraped}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("ferrum_node_agent_pods_enrolled"), 1);
    assert_eq!(
        value("ferrum_node_agent_connects_redirected_total"),
        agent.count("connects")
    );
    assert!(value("ferrum_node_agent_writes_redirected_total") >= 40, "{scraped}");

    // A restart (the DaemonSet still there) leaves everything attached and A enrolled.
    assert!(stop(running).success(), "{}", agent_log());
    assert_eq!(agent.count("enrolled"), 1, "{}", agent_log());
    let (ok, body) = curl_svc_b(&w, "/between-agents");
    assert!(ok, "{body}");
    assert_eq!(
        agent.count("connects") - connects,
        11,
        "still redirected with no agent running"
    );
    let running = run_agent(&w, &agent.0, &log, metrics);

    // Opting out takes A off; opting in again puts it back.
    w.cluster.kubectl(
        &["annotate", "pod", "a-1", "-n", NS, "ferrum.dev/socket-redirect=false"],
        None,
    );
    enrolled_becomes(0, "pod A is forgotten").await;
    let (ok, body) = curl_svc_b(&w, "/opted-out");
    assert!(ok && body.contains("/opted-out from 127.0.0.6"), "{body}");
    assert_eq!(
        agent.count("connects") - connects,
        11,
        "an opted-out pod takes its capture rules"
    );
    w.cluster.kubectl(
        &["annotate", "pod", "a-1", "-n", NS, "ferrum.dev/socket-redirect-"],
        None,
    );
    enrolled_becomes(1, "pod A is enrolled again").await;

    // Uninstall: the DaemonSet goes, then its pods; the agent detaches and the pods talk on.
    w.cluster.kubectl(
        &["delete", "daemonset", "ferrum-node-agent", "-n", "ferrum-system"],
        None,
    );
    assert!(stop(running).success(), "{}", agent_log());
    assert!(!agent.0.exists(), "still pinned after uninstall\n{}", agent_log());
    assert!(agent_log().contains("being uninstalled"), "{}", agent_log());
    let (ok, body) = curl_svc_b(&w, "/after-uninstall");
    assert!(ok && body.contains("/after-uninstall from 127.0.0.6"), "{body}");
    assert_eq!(w.pods[A].echo_bulk(VIP, "payload-gone"), "12000 payload-gone");
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
