//! `ferrum-dp init-iptables` in a network namespace (a "pod", as root): the rules take effect
//! on IPv4 and IPv6 alike — an app's outbound connection lands on 15001 with its original
//! destination intact, the proxy's own traffic (UID 1337) and its connections from the inbound
//! source (127.0.0.6 / ::6) are not captured, the app's calls to its own IP are not captured,
//! a peer's inbound connection lands on 15006 — applying twice changes nothing, and `--cleanup`
//! removes every trace.

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

/// Inside the pod (argv: 4 or 6): listeners on 15001 and 15006 that report the original
/// destination of what they accept, then connections as the app (UID 0) and as the proxy
/// (UID 1337, from anywhere and from the inbound source).
const PROBE: &str = r#"
import json, os, socket, struct, sys, threading, time
v6 = sys.argv[1] == "6"
fam = socket.AF_INET6 if v6 else socket.AF_INET
me, other, source = ("fd00:9:8::1", "fd00:9:8::7", "::6") if v6 else ("10.9.8.1", "10.9.8.7", "127.0.0.6")
def original(c):
    if v6:
        raw = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)  # IP6T_SO_ORIGINAL_DST: a sockaddr_in6
        return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0])
    raw = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST: a sockaddr_in
    return "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
seen = {"15001": [], "15006": []}
def serve(port):
    l = socket.socket(fam); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("::" if v6 else "0.0.0.0", port)); l.listen(8); l.settimeout(3)
    try:
        while True:
            c, _ = l.accept()
            seen[str(port)].append(original(c)); c.close()
    except socket.timeout:
        pass
ts = [threading.Thread(target=serve, args=(p,)) for p in (15001, 15006)]
[t.start() for t in ts]
time.sleep(0.3)
def connect(addr, uid=None, bind=None):
    pid = os.fork()
    if pid == 0:
        if uid is not None:
            os.setgid(uid); os.setuid(uid)
        s = socket.socket(fam); s.settimeout(1)
        try:
            if bind:
                s.bind((bind, 0))
            s.connect(addr); os._exit(0)
        except Exception:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0
res = {
    "app_out": connect((other, 80)),
    "proxy_out": connect((other, 81), uid=1337),
    "app_to_own_ip": connect((me, 8080)),
    "proxy_from_inbound_source": connect((me, 8081), uid=1337, bind=source),
}
[t.join() for t in ts]
res["seen"] = seen
print(json.dumps(res))
"#;

/// The capture, proved in one family: `save` lists its nat table; `me` is the pod's address,
/// `other` one off the pod.
fn captures(family: &str, save: &str, me: &str, other: &str) {
    let literal = |ip: &str| {
        if family == "6" {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    };
    let (pod, node) = pod_and_node();
    let before = pod.nat(save);
    let init = [
        bin(),
        "init-iptables",
        "--exclude-inbound-ports",
        "15008,15020,15021,15090,22",
    ];
    pod.exec(&init);
    let rules = pod.nat(save);
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
    pod.exec(&init);
    assert_eq!(pod.nat(save), rules, "a second run changed the rules");

    let running = pod
        .cmd(&["python3", "-c", PROBE, family])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // A peer on the node calls the pod: captured to 15006, original destination intact.
    let call = format!("import socket; socket.create_connection(('{me}', 9090), timeout=2)");
    let inbound = node.cmd(&["python3", "-c", &call]).status().unwrap();
    assert!(inbound.success(), "the inbound connection reached the capture port");
    let out = running.wait_with_output().unwrap();
    let probe: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(probe["seen"]["15006"][0], format!("{}:9090", literal(me)), "{probe}");
    assert_eq!(probe["app_out"], true, "{probe}");
    assert_eq!(
        probe["seen"]["15001"][0],
        format!("{}:80", literal(other)),
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
    // The app calling its own pod IP goes straight to it (nothing listens on 8080: refused),
    // and so does the proxy reaching the app from the inbound source.
    assert_eq!(probe["app_to_own_ip"], false, "{probe}");
    assert_eq!(probe["proxy_from_inbound_source"], false, "{probe}");
    assert!(!probe["seen"].to_string().contains(":808"), "{probe}");

    pod.exec(&[bin(), "init-iptables", "--cleanup"]);
    assert_eq!(pod.nat(save), before, "cleanup leaves nothing behind");
    // Cleaning up twice is fine.
    pod.exec(&[bin(), "init-iptables", "--cleanup"]);
}

#[test]
fn init_iptables_captures_a_pods_ipv4_traffic_and_cleans_up() {
    captures("4", "iptables-save", "10.9.8.1", "10.9.8.7");
}

/// A dual-stack pod cannot be reached, or reach out, around its sidecar over IPv6; the proxy's
/// IPv6 source towards its app (`::6`) is put on `lo` and taken off again.
#[test]
fn init_iptables_captures_a_pods_ipv6_traffic_and_cleans_up() {
    captures("6", "ip6tables-save", "fd00:9:8::1", "fd00:9:8::7");
    let (pod, _node) = pod_and_node();
    let lo = || pod.exec(&["ip", "-6", "addr", "show", "dev", "lo"]);
    pod.exec(&[bin(), "init-iptables"]);
    assert!(lo().contains("::6/128"), "{}", lo());
    pod.exec(&[bin(), "init-iptables", "--cleanup"]);
    assert!(!lo().contains("::6/128"), "{}", lo());
    // A pod without an IPv6 address of its own gets no IPv6 rules (nor `::6`).
    let v4_only = Netns::new("v4only");
    let before = v4_only.nat("ip6tables-save");
    v4_only.exec(&[bin(), "init-iptables"]);
    assert_eq!(v4_only.nat("ip6tables-save"), before);
    assert!(
        !v4_only
            .exec(&["ip", "-6", "addr", "show", "dev", "lo"])
            .contains("::6/128")
    );
    assert!(
        v4_only.nat("iptables-save").contains("FERRUM_INBOUND"),
        "IPv4 is captured"
    );
}

#[test]
fn dry_run_prints_the_rules_of_both_families_and_changes_nothing() {
    let pod = Netns::new("dry");
    let before = (pod.nat("iptables-save"), pod.nat("ip6tables-save"));
    let out = pod.exec(&[bin(), "init-iptables", "--dry-run", "--inbound-port", "16006"]);
    assert_eq!(out.matches("REDIRECT --to-ports 16006").count(), 2, "{out}");
    assert!(out.contains("-A FERRUM_OUTPUT -o lo -s ::6/128 -j RETURN"), "{out}");
    assert!(
        out.contains("-A FERRUM_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN"),
        "{out}"
    );
    assert_eq!((pod.nat("iptables-save"), pod.nat("ip6tables-save")), before);
}
