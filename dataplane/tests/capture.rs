//! `ferrum-dp init-iptables` in a network namespace (a "pod", as root): the rules take effect —
//! an app's outbound connection lands on 15001 with its original destination intact, the proxy's
//! own traffic (UID 1337) and the app's calls to its own IP are not captured, the inbound chain
//! redirects to 15006 — applying twice changes nothing, and `--cleanup` removes every trace.

mod common;
use common::*;
use ferrum_testkit::netns::{Netns, sh};

/// A "pod" (10.9.8.1, fd00:9:8::1) and a "node" (10.9.8.2, fd00:9:8::2) joined by a veth pair;
/// nothing touches the host's own network.
fn pod_and_node() -> (Netns, Netns) {
    let (pod, node) = (Netns::new("pod"), Netns::new("node"));
    let (a, b) = (
        format!("vp{}", &pod.0[pod.0.len() - 5..]),
        format!("vn{}", &pod.0[pod.0.len() - 5..]),
    );
    sh(&[
        "ip", "link", "add", &a, "netns", &pod.0, "type", "veth", "peer", "name", &b, "netns", &node.0,
    ]);
    for (ns, dev, ip, ip6) in [
        (&pod, &a, "10.9.8.1/24", "fd00:9:8::1/64"),
        (&node, &b, "10.9.8.2/24", "fd00:9:8::2/64"),
    ] {
        ns.exec(&["ip", "addr", "add", ip, "dev", dev]);
        ns.exec(&["ip", "-6", "addr", "add", ip6, "dev", dev, "nodad"]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
    }
    (pod, node)
}

/// Inside the pod: listeners on 15001 and 15006 that report the original destination of what
/// they accept, then connections as the app (UID 0) and as the proxy (UID 1337).
const PROBE: &str = r#"
import json, os, socket, struct, threading
SO_ORIGINAL_DST = 80
seen = {"15001": [], "15006": []}
def serve(port):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port)); l.listen(8); l.settimeout(3)
    try:
        while True:
            c, _ = l.accept()
            raw = c.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            p, ip = struct.unpack("!H", raw[2:4])[0], socket.inet_ntoa(raw[4:8])
            seen[str(port)].append(f"{ip}:{p}"); c.close()
    except socket.timeout:
        pass
ts = [threading.Thread(target=serve, args=(p,)) for p in (15001, 15006)]
[t.start() for t in ts]
import time; time.sleep(0.3)
def connect(addr, uid=None):
    pid = os.fork()
    if pid == 0:
        if uid is not None:
            os.setgid(uid); os.setuid(uid)
        s = socket.socket(); s.settimeout(1)
        try:
            s.connect(addr); os._exit(0)
        except Exception:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0
res = {
    "app_out": connect(("10.9.8.7", 80)),
    "proxy_out": connect(("10.9.8.7", 81), uid=1337),
    "app_to_own_ip": connect(("10.9.8.1", 8080)),
}
[t.join() for t in ts]
res["seen"] = seen
print(json.dumps(res))
"#;

#[test]
fn init_iptables_captures_a_pods_traffic_and_cleans_up() {
    let (pod, node) = pod_and_node();
    let before = pod.nat();
    pod.exec(&[
        bin(),
        "init-iptables",
        "--exclude-inbound-ports",
        "15008,15020,15021,15090,22",
    ]);
    let rules = pod.nat();
    for want in [
        "-A PREROUTING -p tcp -j FERRUM_INBOUND",
        "-A OUTPUT -p tcp -j FERRUM_OUTPUT",
        "-A FERRUM_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A FERRUM_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A FERRUM_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A FERRUM_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(rules.contains(want), "missing {want:?} in\n{rules}");
    }
    // Idempotent: the same rules, not a second copy.
    pod.exec(&[
        bin(),
        "init-iptables",
        "--exclude-inbound-ports",
        "15008,15020,15021,15090,22",
    ]);
    assert_eq!(pod.nat(), rules, "a second run changed the rules");

    let running = pod
        .cmd(&["python3", "-c", PROBE])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // A peer on the node calls the pod: captured to 15006, original destination intact.
    let inbound = node
        .cmd(&[
            "python3",
            "-c",
            "import socket; socket.create_connection(('10.9.8.1', 9090), timeout=2)",
        ])
        .status()
        .unwrap();
    assert!(inbound.success(), "the inbound connection reached the capture port");
    let out = running.wait_with_output().unwrap();
    let probe: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(probe["seen"]["15006"][0], "10.9.8.1:9090", "{probe}");
    assert_eq!(probe["app_out"], true, "{probe}");
    assert_eq!(
        probe["seen"]["15001"][0], "10.9.8.7:80",
        "outbound lands on 15001 with its original destination: {probe}"
    );
    assert_eq!(
        probe["proxy_out"], false,
        "the proxy's own traffic is not captured: {probe}"
    );
    assert!(
        !probe["seen"]["15001"].to_string().contains(":81"),
        "UID 1337 went through the capture: {probe}"
    );
    // The app calling its own pod IP goes straight to it (nothing listens on 8080: refused).
    assert_eq!(probe["app_to_own_ip"], false, "{probe}");
    assert!(!probe["seen"].to_string().contains(":8080"), "{probe}");

    pod.exec(&[bin(), "init-iptables", "--cleanup"]);
    assert_eq!(pod.nat(), before, "cleanup leaves nothing behind");
    // Cleaning up twice is fine.
    pod.exec(&[bin(), "init-iptables", "--cleanup"]);
}

#[test]
fn dry_run_prints_the_rules_and_changes_nothing() {
    let pod = Netns::new("dry");
    let before = pod.nat();
    let out = pod.exec(&[bin(), "init-iptables", "--dry-run", "--inbound-port", "16006"]);
    assert!(out.contains("REDIRECT --to-ports 16006"), "{out}");
    assert!(out.contains("-A FERRUM_OUTPUT -j FERRUM_REDIRECT"), "{out}");
    assert_eq!(pod.nat(), before);
}

/// Whether a TCP connection from `from` to `[addr]:port` is accepted (something listens there).
fn connects(from: &Netns, addr: &str, port: u16) -> bool {
    let code = format!("import socket; socket.create_connection(('{addr}', {port}), timeout=2)");
    from.cmd(&["python3", "-c", &code])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Listens on `[::]:port` in `ns` (IPv6) until dropped.
struct Listener6(std::process::Child);
impl Listener6 {
    fn start(ns: &Netns, port: u16) -> Listener6 {
        let code = format!(
            "import socket, time\ns = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('::', {port})); s.listen(64)\nwhile True:\n    c, _ = s.accept(); c.close()\n"
        );
        let l = Listener6(ns.cmd(&["python3", "-c", &code]).spawn().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(300));
        l
    }
}
impl Drop for Listener6 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// IPv6 is not captured, so it must not be a way around the proxy: once the rules are in, new
/// inbound TCP over IPv6 is refused (an excluded port still answers), the pod's own IPv6 calls
/// out still work, and cleanup opens it again.
#[test]
fn ipv6_cannot_bypass_the_inbound_capture() {
    let (pod, node) = pod_and_node();
    let filter6 = || pod.exec(&["ip6tables-save", "-t", "filter"]);
    let before = filter6();
    let (_app, _excluded, _remote) = (
        Listener6::start(&pod, 9090),
        Listener6::start(&pod, 15021),
        Listener6::start(&node, 7070),
    );
    assert!(
        connects(&node, "fd00:9:8::1", 9090),
        "reachable over IPv6 before the rules"
    );
    pod.exec(&[bin(), "init-iptables"]);
    assert!(
        !connects(&node, "fd00:9:8::1", 9090),
        "an IPv6 connection to the app went around the sidecar"
    );
    assert!(connects(&node, "fd00:9:8::1", 15021), "excluded inbound ports answer");
    assert!(
        connects(&pod, "fd00:9:8::2", 7070),
        "the pod's outbound IPv6 gets its replies"
    );
    assert!(connects(&pod, "::1", 9090), "loopback is the pod's own business");
    // Idempotent, and cleanup leaves the filter table as it was.
    pod.exec(&[bin(), "init-iptables"]);
    assert_eq!(filter6().matches("FERRUM_INBOUND6 -p tcp -j REJECT").count(), 1);
    pod.exec(&[bin(), "init-iptables", "--cleanup"]);
    // Chains and rules only (no comments, no packet counters).
    let strip = |t: String| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with("-A") || l.starts_with(':'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_string())
            .collect()
    };
    assert_eq!(strip(filter6()), strip(before));
    assert!(connects(&node, "fd00:9:8::1", 9090), "reachable again after cleanup");
}
