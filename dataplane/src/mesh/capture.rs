//! `ferrum-dp init-iptables`: the sidecar's traffic capture rules (nat table), as istio-init
//! writes them (mesh.md): a pod's inbound TCP goes to 15006, its outbound to 15001, and the
//! proxy's own traffic (UID/GID 1337) is left alone. Applied atomically and idempotently with
//! `iptables-restore`, with whichever iptables (nft or legacy) the host already uses.
//!
//! IPv6 is not captured; so that it cannot bypass the proxy (and STRICT mTLS), new inbound TCP
//! over IPv6 is refused (ip6tables filter table) except on loopback and the excluded ports —
//! as istio-init does when IPv6 capture is off. Connections the pod opens still get replies.

use std::fmt::Write as _;
use std::process::{Command, Stdio};

#[derive(Debug, Clone)]
pub struct Capture {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// Inbound ports never captured (HBONE, proxy metrics and readiness, plus the user's).
    pub exclude_inbound: Vec<u16>,
    /// Outbound destination ports never captured.
    pub exclude_outbound: Vec<u16>,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            proxy_uid: 1337,
            proxy_gid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound: vec![15008, 15020, 15021, 15090],
            exclude_outbound: Vec::new(),
        }
    }
}

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

const CHAINS: [&str; 4] = [
    "FERRUM_INBOUND",
    "FERRUM_IN_REDIRECT",
    "FERRUM_OUTPUT",
    "FERRUM_REDIRECT",
];
/// The jumps from the built-in chains into ours: added once, removed on cleanup.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", "FERRUM_INBOUND"), ("OUTPUT", "FERRUM_OUTPUT")];
/// The IPv6 inbound guard (filter table) and its jump.
const CHAIN6: &str = "FERRUM_INBOUND6";
const JUMP6: (&str, &str) = ("INPUT", CHAIN6);

/// The ip6tables of the same flavour as `iptables` (`iptables-nft` → `ip6tables-nft`).
pub fn ip6tables(iptables: &str) -> String {
    match iptables.rfind("iptables") {
        Some(i) => format!("{}ip6tables{}", &iptables[..i], &iptables[i + "iptables".len()..]),
        None => "ip6tables".into(),
    }
}

/// Whether the kernel has IPv6 at all (without it there is nothing to guard).
fn has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

impl Capture {
    /// The `iptables-restore --noflush` input: our chains, declared (so emptied) and filled.
    pub fn restore_input(&self) -> String {
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
        // Order matters (mesh.md): the sidecar's inbound-to-app source, the app calling its own
        // pod IP through the proxy, other loopback traffic, the proxy's own traffic, localhost.
        let _ = writeln!(s, "-A FERRUM_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN");
        for (m, id) in [("uid", self.proxy_uid), ("gid", self.proxy_gid)] {
            let _ = writeln!(
                s,
                "-A FERRUM_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --{m}-owner {id} -j FERRUM_IN_REDIRECT"
            );
            let _ = writeln!(s, "-A FERRUM_OUTPUT -o lo -m owner ! --{m}-owner {id} -j RETURN");
            let _ = writeln!(s, "-A FERRUM_OUTPUT -m owner --{m}-owner {id} -j RETURN");
        }
        let _ = writeln!(s, "-A FERRUM_OUTPUT -d 127.0.0.1/32 -j RETURN");
        for p in &self.exclude_outbound {
            let _ = writeln!(s, "-A FERRUM_OUTPUT -p tcp --dport {p} -j RETURN");
        }
        let _ = writeln!(s, "-A FERRUM_OUTPUT -j FERRUM_REDIRECT");
        s.push_str("COMMIT\n");
        s
    }

    /// The `ip6tables-restore --noflush` input: new inbound TCP over IPv6 is refused (a reset)
    /// unless it is on loopback, a reply, or to an excluded port.
    pub fn ipv6_guard_input(&self) -> String {
        let mut s = format!("*filter\n:{CHAIN6} - [0:0]\n");
        let _ = writeln!(s, "-A {CHAIN6} -i lo -j RETURN");
        let _ = writeln!(s, "-A {CHAIN6} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN");
        for p in &self.exclude_inbound {
            let _ = writeln!(s, "-A {CHAIN6} -p tcp --dport {p} -j RETURN");
        }
        let _ = writeln!(s, "-A {CHAIN6} -p tcp -j REJECT --reject-with tcp-reset");
        s.push_str("COMMIT\n");
        s
    }

    /// What `--dry-run` prints: the restore inputs and the jump commands, for `iptables`.
    pub fn describe(&self, iptables: &str) -> String {
        let mut s = format!("# {iptables}-restore --noflush <<EOF\n{}EOF\n", self.restore_input());
        for (from, to) in JUMPS {
            let _ = writeln!(s, "{iptables} -t nat -A {from} -p tcp -j {to}   # unless present");
        }
        let v6 = ip6tables(iptables);
        let _ = write!(s, "# {v6}-restore --noflush <<EOF\n{}EOF\n", self.ipv6_guard_input());
        let _ = writeln!(
            s,
            "{v6} -t filter -A {} -p tcp -j {}   # unless present",
            JUMP6.0, JUMP6.1
        );
        s
    }

    /// Installs the rules; running it again changes nothing.
    pub fn apply(&self, iptables: &str) -> Result<(), CaptureError> {
        run(
            &format!("{iptables}-restore"),
            &["--noflush"],
            Some(&self.restore_input()),
        )?;
        for (from, to) in JUMPS {
            if !present(iptables, "nat", from, to) {
                run(iptables, &["-t", "nat", "-A", from, "-p", "tcp", "-j", to], None)?;
            }
        }
        if !has_ipv6() {
            return Ok(());
        }
        let v6 = ip6tables(iptables);
        run(&format!("{v6}-restore"), &["--noflush"], Some(&self.ipv6_guard_input()))?;
        let (from, to) = JUMP6;
        if !present(&v6, "filter", from, to) {
            run(&v6, &["-t", "filter", "-A", from, "-p", "tcp", "-j", to], None)?;
        }
        Ok(())
    }
}

/// Removes the jumps and our chains; fine to run when nothing is installed.
pub fn cleanup(iptables: &str) -> Result<(), CaptureError> {
    remove(iptables, "nat", &JUMPS, &CHAINS)?;
    if has_ipv6() {
        remove(&ip6tables(iptables), "filter", &[JUMP6], &[CHAIN6])?;
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
    fn rules_follow_the_istio_init_order() {
        let c = Capture {
            exclude_inbound: vec![15008, 22],
            exclude_outbound: vec![5432],
            ..Capture::default()
        };
        let r = c.restore_input();
        let lines: Vec<&str> = r.lines().collect();
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle}\n{r}"))
        };
        assert!(at("--dport 22 -j RETURN") < at("FERRUM_INBOUND -p tcp -j FERRUM_IN_REDIRECT"));
        assert!(at("-s 127.0.0.6/32") < at("! -d 127.0.0.1/32 -m owner --uid-owner 1337"));
        assert!(at("-m owner --uid-owner 1337 -j RETURN") < at("-d 127.0.0.1/32 -j RETURN"));
        assert!(at("--dport 5432 -j RETURN") < at("-A FERRUM_OUTPUT -j FERRUM_REDIRECT"));
        assert!(r.contains("REDIRECT --to-ports 15006") && r.contains("REDIRECT --to-ports 15001"));
        assert!(r.starts_with("*nat\n:FERRUM_INBOUND - [0:0]") && r.ends_with("COMMIT\n"));
    }

    #[test]
    fn the_ipv6_guard_lets_replies_loopback_and_excluded_ports_through_first() {
        let c = Capture {
            exclude_inbound: vec![15008],
            ..Capture::default()
        };
        let r = c.ipv6_guard_input();
        let reject = r.find("-j REJECT --reject-with tcp-reset").expect("a reject");
        for allowed in [
            "-i lo -j RETURN",
            "--ctstate ESTABLISHED,RELATED -j RETURN",
            "--dport 15008 -j RETURN",
        ] {
            assert!(r.find(allowed).is_some_and(|at| at < reject), "{allowed}\n{r}");
        }
        assert_eq!(ip6tables("iptables-nft"), "ip6tables-nft");
        assert_eq!(ip6tables("/usr/sbin/iptables-legacy"), "/usr/sbin/ip6tables-legacy");
        assert_eq!(ip6tables("iptables"), "ip6tables");
    }
}
