//! Network namespaces as "pods" (root only): each with its own loopback, addresses, routes and
//! iptables, joined by veth pairs — to a bridge on the host for several pods, or to one peer.

use std::process::Command;

/// Runs a command; panics with its stderr when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed (this test needs root, ip and iptables): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Five digits no other namespace, veth or bridge of this process has: interface names derive
/// from it (a free port, used before, could be handed to two tests at once).
fn unique_tag() -> String {
    format!("{:05}", unique())
}

fn unique() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::process::id().wrapping_mul(7919).wrapping_add(n) % 100_000
}

/// A /24 (`10.x.y`) no other bridge of this process has: two worlds on one host at once must
/// not route the same subnet.
pub fn unique_subnet() -> String {
    let n = unique();
    format!("10.{}.{}", 100 + (n / 250) % 100, n % 250)
}

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(role: &str) -> Netns {
        let name = format!("ferrum-{role}-{}", unique_tag());
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command to run inside the namespace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    /// The namespace's path, for `setns` or tools that take one.
    pub fn path(&self) -> std::path::PathBuf {
        format!("/run/netns/{}", self.0).into()
    }

    /// Runs `f` on a thread that has entered the namespace (setns changes only that thread's),
    /// so a test can open sockets inside a "pod" without a helper process.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(self.path()).expect("the namespace exists");
        std::thread::spawn(move || {
            // SAFETY: a valid namespace fd; CLONE_NEWNET affects the calling thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.0];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// The nat table's chains and rules (IPv4; `ip6tables-save` for IPv6).
    pub fn nat(&self, save: &str) -> String {
        self.exec(&[save, "-t", "nat"])
            .lines()
            .filter(|l| l.starts_with("-A") || l.starts_with(':'))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A bridge on the host with an address in a /24 (`<prefix>.1`) and one in a /64
/// (`<prefix6>1`), for pods to join (dual-stack); the host's processes (an operator, a CA) are
/// reachable from the pods there. Bridged traffic skips the host's iptables. Deleted on drop.
pub struct Bridge {
    pub name: String,
    /// e.g. `10.77.3`.
    pub prefix: String,
    /// e.g. `fd00:77:3::` (from `prefix`: as unique).
    pub prefix6: String,
}

impl Bridge {
    pub fn new(prefix: &str) -> Bridge {
        let name = format!("fbr{}", unique_tag());
        sh(&[
            "ip",
            "link",
            "add",
            "name",
            &name,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
        ]);
        let mut octets = prefix.split('.').skip(1);
        let prefix6 = format!(
            "fd00:{}:{}::",
            octets.next().unwrap_or("0"),
            octets.next().unwrap_or("0")
        );
        let b = Bridge {
            name,
            prefix: prefix.to_string(),
            prefix6,
        };
        sh(&["ip", "addr", "add", &format!("{prefix}.1/24"), "dev", &b.name]);
        let v6 = format!("{}1/64", b.prefix6);
        sh(&["ip", "-6", "addr", "add", &v6, "dev", &b.name, "nodad"]);
        sh(&["ip", "link", "set", &b.name, "up"]);
        b
    }

    pub fn host_ip(&self) -> String {
        format!("{}.1", self.prefix)
    }

    pub fn host_ip6(&self) -> String {
        format!("{}1", self.prefix6)
    }

    /// A pod at `<prefix>.<host>` and `<prefix6><host>` with default routes via the bridge (so
    /// Service VIPs route and can be captured). Returns the namespace and the host-side veth
    /// (for captures).
    pub fn pod(&self, role: &str, host: u8) -> (Netns, String) {
        let ns = Netns::new(role);
        let tag = &ns.0[ns.0.len() - 5..];
        let (inner, outer) = (format!("eth{tag}"), format!("vh{tag}"));
        sh(&[
            "ip", "link", "add", &inner, "netns", &ns.0, "type", "veth", "peer", "name", &outer,
        ]);
        sh(&["ip", "link", "set", &outer, "master", &self.name]);
        sh(&["ip", "link", "set", &outer, "up"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}.{host}/24", self.prefix),
            "dev",
            &inner,
        ]);
        let v6 = format!("{}{host}/64", self.prefix6);
        ns.exec(&["ip", "-6", "addr", "add", &v6, "dev", &inner, "nodad"]);
        ns.exec(&["ip", "link", "set", &inner, "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", &self.host_ip()]);
        ns.exec(&["ip", "-6", "route", "add", "default", "via", &self.host_ip6()]);
        (ns, outer)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).status();
    }
}
