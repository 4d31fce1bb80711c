//! `ferrum-dp init-iptables`: the sidecar's traffic capture rules (nat table), as istio-init
//! writes them (mesh.md): a pod's inbound TCP goes to 15006, its outbound to 15001, and the
//! proxy's own traffic (UID/GID 1337) is left alone. Applied atomically and idempotently with
//! `iptables-restore`, with whichever iptables (nft or legacy) the host already uses — and the
//! same rules with `ip6tables` when the pod has an IPv6 address, so a dual-stack pod is captured
//! on both.
//!
//! The proxy reaches its own application from `127.0.0.6` / `::6`, which the rules leave alone.
//! Every 127/8 address is local, but IPv6 has only `::1`: `::6/128` is added to `lo` (as
//! istio-init does) so the proxy can bind it and the application's replies come back.

use std::fmt::Write as _;
use std::process::{Command, Stdio};

pub use ferrum_snapshot::mesh::Capture;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

/// The addresses the rules name, per IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The proxy's source towards its own application, as a rule matches it.
    fn inbound_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The iptables of this family and the flavour of `iptables` (`iptables-nft` → `ip6tables-nft`).
    pub fn iptables(self, iptables: &str) -> String {
        match (self, iptables.rfind("iptables")) {
            (Family::V4, _) => iptables.into(),
            (Family::V6, Some(i)) => format!("{}ip6tables{}", &iptables[..i], &iptables[i + "iptables".len()..]),
            (Family::V6, None) => "ip6tables".into(),
        }
    }
}

const CHAINS: [&str; 4] = [
    "FERRUM_INBOUND",
    "FERRUM_IN_REDIRECT",
    "FERRUM_OUTPUT",
    "FERRUM_REDIRECT",
];
/// The jumps from the built-in chains into ours: added once, removed on cleanup.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", "FERRUM_INBOUND"), ("OUTPUT", "FERRUM_OUTPUT")];

/// The families to capture: IPv4, and IPv6 when the pod has an IPv6 address of global scope
/// (one with only `::1` and link-local addresses can neither be reached nor reach out over
/// IPv6, and needs no IPv6 NAT from the kernel).
fn families() -> Vec<Family> {
    let mut f = vec![Family::V4];
    let addresses = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
    if has_global_ipv6(&addresses) {
        f.push(Family::V6);
    }
    f
}

/// Whether `/proc/net/if_inet6` (address, index, prefix length, scope, flags, name) lists an
/// address of global scope (`00`).
fn has_global_ipv6(if_inet6: &str) -> bool {
    if_inet6.lines().any(|l| l.split_whitespace().nth(3) == Some("00"))
}

/// The rules of a [`Capture`].
pub trait Rules {
    /// The `iptables-restore --noflush` input for one family: our chains, declared (so
    /// emptied) and filled.
    fn restore_input(&self, family: Family) -> String;
    /// What `--dry-run` prints: per family, the restore input and the jump commands.
    fn describe(&self, iptables: &str) -> String;
    /// Installs the rules for every family the pod has; running it again changes nothing.
    fn apply(&self, iptables: &str) -> Result<(), CaptureError>;
}

impl Rules for Capture {
    fn restore_input(&self, family: Family) -> String {
        let mut s = String::from("*nat\n");
        for c in CHAINS {
            let _ = writeln!(s, ":{c} - [0:0]");
        }
        for p in &self.exclude_inbound {
            let _ = writeln!(s, "-A FERRUM_INBOUND -p tcp --dport {p} -j RETURN");
        }
        let _ = writeln!(s, "-A FERRUM_INBOUND -p tcp -j FERRUM_IN_REDIRECT");
        let _ = writeln!(
            s,
            "-A FERRUM_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        );
        let _ = writeln!(
            s,
            "-A FERRUM_REDIRECT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        let (source, localhost) = (family.inbound_source(), family.localhost());
        // Order matters (mesh.md): the sidecar's inbound-to-app source, the app calling its own
        // pod IP through the proxy, other loopback traffic, the proxy's own traffic, localhost.
        let _ = writeln!(s, "-A FERRUM_OUTPUT -o lo -s {source} -j RETURN");
        for (m, id) in [("uid", self.proxy_uid), ("gid", self.proxy_gid)] {
            let _ = writeln!(
                s,
                "-A FERRUM_OUTPUT -o lo ! -d {localhost} -m owner --{m}-owner {id} -j FERRUM_IN_REDIRECT"
            );
            let _ = writeln!(s, "-A FERRUM_OUTPUT -o lo -m owner ! --{m}-owner {id} -j RETURN");
            let _ = writeln!(s, "-A FERRUM_OUTPUT -m owner --{m}-owner {id} -j RETURN");
        }
        let _ = writeln!(s, "-A FERRUM_OUTPUT -d {localhost} -j RETURN");
        for p in &self.exclude_outbound {
            let _ = writeln!(s, "-A FERRUM_OUTPUT -p tcp --dport {p} -j RETURN");
        }
        let _ = writeln!(s, "-A FERRUM_OUTPUT -j FERRUM_REDIRECT");
        s.push_str("COMMIT\n");
        s
    }

    fn describe(&self, iptables: &str) -> String {
        let mut s = String::new();
        for family in [Family::V4, Family::V6] {
            let bin = family.iptables(iptables);
            let _ = write!(
                s,
                "# {bin}-restore --noflush <<EOF\n{}EOF\n",
                self.restore_input(family)
            );
            for (from, to) in JUMPS {
                let _ = writeln!(s, "{bin} -t nat -A {from} -p tcp -j {to}   # unless present");
            }
        }
        s.push_str("ip -6 addr replace ::6/128 dev lo   # when the kernel has IPv6\n");
        s
    }

    fn apply(&self, iptables: &str) -> Result<(), CaptureError> {
        for family in families() {
            let bin = family.iptables(iptables);
            if family == Family::V6 {
                run("ip", &["-6", "addr", "replace", "::6/128", "dev", "lo"], None)?;
            }
            run(
                &format!("{bin}-restore"),
                &["--noflush"],
                Some(&self.restore_input(family)),
            )?;
            for (from, to) in JUMPS {
                if !present(&bin, "nat", from, to) {
                    run(&bin, &["-t", "nat", "-A", from, "-p", "tcp", "-j", to], None)?;
                }
            }
        }
        Ok(())
    }
}

/// Removes the jumps and our chains (and `::6` from `lo`); fine to run when nothing is installed.
pub fn cleanup(iptables: &str) -> Result<(), CaptureError> {
    for family in families() {
        let bin = family.iptables(iptables);
        remove(&bin, "nat", &JUMPS, &CHAINS)?;
        if family == Family::V6 {
            // Absent already is the state we want.
            let _ = run("ip", &["-6", "addr", "del", "::6/128", "dev", "lo"], None);
        }
    }
    Ok(())
}

/// Removes `jumps` and then `chains` from `table`.
fn remove(iptables: &str, table: &str, jumps: &[(&str, &str)], chains: &[&str]) -> Result<(), CaptureError> {
    for (from, to) in jumps {
        while present(iptables, table, from, to) {
            run(iptables, &["-t", table, "-D", from, "-p", "tcp", "-j", to], None)?;
        }
    }
    for c in chains {
        // Absent chains fail here; that is the state we want.
        let _ = run(iptables, &["-t", table, "-F", c], None);
    }
    for c in chains {
        let _ = run(iptables, &["-t", table, "-X", c], None);
    }
    Ok(())
}

fn present(iptables: &str, table: &str, from: &str, to: &str) -> bool {
    run(iptables, &["-t", table, "-C", from, "-p", "tcp", "-j", to], None).is_ok()
}

/// The iptables the host uses: the flavour (nft or legacy) that already holds rules, else the
/// system default. Mixing them leaves two rule sets that both apply.
pub fn detect() -> String {
    let rules = |bin: &str| {
        Command::new(format!("{bin}-save"))
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A"))
                    .count()
            })
    };
    match (rules("iptables-legacy"), rules("iptables-nft")) {
        (Some(l), Some(n)) if l > n => "iptables-legacy".into(),
        (Some(_), Some(n)) if n > 0 => "iptables-nft".into(),
        _ => "iptables".into(),
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<(), CaptureError> {
    use std::io::Write;
    let name = format!("{cmd} {}", args.join(" "));
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CaptureError::Spawn {
            cmd: name.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| CaptureError::Spawn {
            cmd: name.clone(),
            source,
        })?;
    }
    let out = child.wait_with_output().map_err(|source| CaptureError::Spawn {
        cmd: name.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Failed {
            cmd: name,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_the_istio_init_order_in_both_families() {
        let c = Capture {
            exclude_inbound: vec![15008, 22],
            exclude_outbound: vec![5432],
            ..Capture::default()
        };
        for (family, source, localhost) in [
            (Family::V4, "127.0.0.6/32", "127.0.0.1/32"),
            (Family::V6, "::6/128", "::1/128"),
        ] {
            let r = c.restore_input(family);
            let lines: Vec<&str> = r.lines().collect();
            let at = |needle: &str| {
                lines
                    .iter()
                    .position(|l| l.contains(needle))
                    .unwrap_or_else(|| panic!("{needle}\n{r}"))
            };
            assert!(at("--dport 22 -j RETURN") < at("FERRUM_INBOUND -p tcp -j FERRUM_IN_REDIRECT"));
            assert!(at(&format!("-s {source}")) < at(&format!("! -d {localhost} -m owner --uid-owner 1337")));
            assert!(at("-m owner --uid-owner 1337 -j RETURN") < at(&format!("-d {localhost} -j RETURN")));
            assert!(at("--dport 5432 -j RETURN") < at("-A FERRUM_OUTPUT -j FERRUM_REDIRECT"));
            assert!(r.contains("REDIRECT --to-ports 15006") && r.contains("REDIRECT --to-ports 15001"));
            assert!(r.starts_with("*nat\n:FERRUM_INBOUND - [0:0]") && r.ends_with("COMMIT\n"));
        }
        assert!(!c.restore_input(Family::V6).contains("127.0.0"));
    }

    #[test]
    fn ipv6_is_captured_where_the_pod_has_a_global_address() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n";
        let global = "fd000000000000000000000000000002 04 40 00 82     eth0\n";
        assert!(!has_global_ipv6(""));
        assert!(!has_global_ipv6(&format!("{lo}{link}")));
        assert!(has_global_ipv6(&format!("{link}{lo}{global}")));
    }

    #[test]
    fn ip6tables_has_the_flavour_of_iptables() {
        assert_eq!(Family::V6.iptables("iptables-nft"), "ip6tables-nft");
        assert_eq!(
            Family::V6.iptables("/usr/sbin/iptables-legacy"),
            "/usr/sbin/ip6tables-legacy"
        );
        assert_eq!(Family::V6.iptables("iptables"), "ip6tables");
        assert_eq!(Family::V4.iptables("iptables-nft"), "iptables-nft");
    }
}
