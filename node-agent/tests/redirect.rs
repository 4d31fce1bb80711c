//! The sidecar → app hop with the programs attached (as root, in network namespaces of its
//! own): bytes written from 127.0.0.6 to the app, and the app's answers, are queued straight onto
//! the peer socket — in order, with backpressure and half-close intact, never to a socket of
//! another namespace — and nothing else is touched.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use ferrum_node_agent::redirect::{self, Counts};
use ferrum_node_agent::{enroll, host};
use ferrum_testkit::netns::{Netns, sh};

/// A "pod" namespace for these tests.
fn netns() -> Netns {
    Netns::new("na")
}

/// Reads from a paired socket as a blocking reader should see it. The kernel's receive path
/// for paired sockets (`tcp_bpf_recvmsg`) answers a blocking read woken by anything but data —
/// the ACK of our FIN, say — with EAGAIN; the sidecar's sockets are non-blocking and take that as
/// "not yet", so the tests' stand-ins do too.
struct Patient<'a>(&'a TcpStream);

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match (&mut &*self.0).read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(1)),
                read => return read,
            }
        }
    }
}

/// Packets sent on the namespace's loopback so far.
fn lo_packets(ns: &Netns) -> u64 {
    ns.exec(&["cat", "/sys/class/net/lo/statistics/tx_packets"])
        .trim()
        .parse()
        .expect("a packet count")
}

fn cgroup() -> PathBuf {
    host::cgroup2_root().expect("a cgroup v2 mount")
}

/// The programs attached on this test's own pin directory, detached on drop. They see every
/// socket of the machine and their counters are global, so the tests take turns.
struct Attached(PathBuf, #[allow(dead_code)] MutexGuard<'static, ()>);

/// The programs see every socket of the machine and their counters are global: one test at a
/// time.
fn turn() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

impl Attached {
    fn new(name: &str) -> Attached {
        let turn = turn();
        let dir = PathBuf::from(format!("/sys/fs/bpf/ferrum-test-{name}-{}", std::process::id()));
        let cgroup = host::cgroup2_root().expect("a cgroup v2 mount");
        assert_eq!(
            redirect::attach(&dir, &cgroup).expect("attach"),
            redirect::Attached::Now
        );
        assert_eq!(
            redirect::attach(&dir, &cgroup).expect("attach again"),
            redirect::Attached::Already
        );
        Attached(dir, turn)
    }

    fn counts(&self) -> Counts {
        redirect::counts(&self.0).expect("counters")
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        redirect::detach(&self.0, &cgroup(), Duration::ZERO).expect("detach");
    }
}

/// An app on `addr` that answers each message with `tag` and the message, until EOF, then says
/// "bye" and closes.
fn app(addr: &'static str, tag: &'static [u8]) -> impl FnOnce() -> u64 + Send {
    move || {
        let listener = TcpListener::bind(addr).expect("bind the app");
        let (mut s, _) = listener.accept().expect("accept");
        let (mut buf, mut total) = (vec![0; 1 << 16], 0u64);
        loop {
            let n = Patient(&s).read(&mut buf).expect("read");
            if n == 0 {
                s.write_all(b"bye").expect("write");
                return total;
            }
            total += n as u64;
            s.write_all(tag).expect("write");
            s.write_all(&buf[..n]).expect("write");
        }
    }
}

/// Connects from `from` (127.0.0.6 and ::6 are the sidecar's inbound sources) to `to`.
fn connect(from: &str, to: &str) -> TcpStream {
    let from: SocketAddr = from.parse().expect("an address");
    let socket = socket2::Socket::new(socket2::Domain::for_address(from), socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.bind(&from.into()).expect("bind the sidecar end");
    for _ in 0..100 {
        if socket
            .connect(&to.parse::<SocketAddr>().expect("an address").into())
            .is_ok()
        {
            return socket.into();
        }
        thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{to} never accepted");
}

/// Sends `n` numbered messages one at a time; each answer must be the tag and that message.
fn exchange(s: &mut TcpStream, tag: &[u8], n: usize) {
    for i in 0..n {
        let msg = format!("{i:08}").repeat(1 + i % 64);
        s.write_all(msg.as_bytes()).expect("write");
        let mut got = vec![0; tag.len() + msg.len()];
        Patient(s).read_exact(&mut got).expect("read the answer");
        assert_eq!(
            &got[..tag.len()],
            tag,
            "message {i} answered by the other namespace's app"
        );
        assert_eq!(&got[tag.len()..], msg.as_bytes(), "message {i} out of order or changed");
    }
}

#[test]
fn the_sidecar_to_app_hop_skips_loopback_and_keeps_tcp_semantics() {
    let on = Attached::new("hop");
    let before = on.counts();
    let ns = netns();
    let server = ns.spawn(app("127.0.0.1:8080", b"A:"));
    let lo_before = lo_packets(&ns);
    let client = ns.spawn(|| {
        let mut s = connect("127.0.0.6:0", "127.0.0.1:8080");
        exchange(&mut s, b"A:", 2_000);
        // 8 MiB in one write, more than both socket buffers: backpressure, not loss.
        let big = vec![7u8; 8 << 20];
        let reader = s.try_clone().expect("clone");
        // The app answers each read with its tag and what it read: count the payload bytes back.
        let echo = thread::spawn(move || {
            let (mut buf, mut payload) = (vec![0; 1 << 16], 0);
            while payload < 8 << 20 {
                let n = Patient(&reader).read(&mut buf).expect("the big echo");
                assert!(n > 0, "EOF after {payload} bytes of the big echo");
                assert!(
                    buf[..n].iter().all(|b| matches!(b, 7 | b'A' | b':')),
                    "a stray byte in the big echo"
                );
                payload += buf[..n].iter().filter(|b| **b == 7).count();
            }
            payload == 8 << 20
        });
        s.write_all(&big).expect("write 8 MiB");
        assert!(echo.join().unwrap(), "the big message came back intact");
        // Half-close: the app sees EOF only after everything, and its last word still arrives.
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        Patient(&s).read_to_end(&mut rest).expect("read to EOF");
        rest
    });
    let rest = client.join().expect("the client");
    assert_eq!(rest, b"bye");
    let received = server.join().expect("the app");
    assert!(received > 8 << 20, "the app read {received} bytes");
    let after = on.counts();
    assert_eq!(after.paired - before.paired, 2, "both ends paired: {after:?}");
    assert!(
        after.redirected - before.redirected >= 4_000,
        "writes redirected: {after:?}"
    );
    let lo = lo_packets(&ns) - lo_before;
    assert!(lo < 100, "{lo} packets crossed loopback for 4,000 messages and 16 MiB");
}

#[test]
fn connections_not_from_the_inbound_source_are_left_alone() {
    let on = Attached::new("other");
    let before = on.counts();
    let ns = netns();
    let server = ns.spawn(app("127.0.0.1:8081", b"B:"));
    let lo_before = lo_packets(&ns);
    ns.spawn(|| {
        let mut s = connect("127.0.0.1:0", "127.0.0.1:8081");
        exchange(&mut s, b"B:", 200);
    })
    .join()
    .expect("the client");
    server.join().expect("the app");
    assert_eq!(
        on.counts().paired,
        before.paired,
        "a plain loopback connection was paired"
    );
    assert!(
        lo_packets(&ns) - lo_before >= 400,
        "the messages crossed loopback as TCP"
    );
}

#[test]
fn identical_connections_in_two_namespaces_stay_apart() {
    let on = Attached::new("apart");
    let (one, two) = (netns(), netns());
    let servers = [
        one.spawn(app("127.0.0.1:8082", b"1:")),
        two.spawn(app("127.0.0.1:8082", b"2:")),
    ];
    // The same four-tuple in both namespaces, talking at the same time.
    let clients = [(&one, b"1:"), (&two, b"2:")].map(|(ns, tag)| {
        ns.spawn(move || {
            let mut s = connect("127.0.0.6:40001", "127.0.0.1:8082");
            exchange(&mut s, tag, 1_000);
        })
    });
    for c in clients {
        c.join().expect("a client");
    }
    for s in servers {
        s.join().expect("an app");
    }
    assert!(on.counts().paired >= 4, "{:?}", on.counts());
}

/// The hop in the other families: an app on a dual-stack socket reached over IPv4 (its peer is
/// `::ffff:127.0.0.6` to it), and IPv6 from `::6` (which init-iptables puts on `lo`).
#[test]
fn dual_stack_and_ipv6_apps_are_paired_too() {
    let on = Attached::new("families");
    let ns = netns();
    ns.exec(&["ip", "-6", "addr", "add", "::6/128", "dev", "lo"]);
    for (listen, from, to, tag) in [
        ("[::]:8084", "127.0.0.6:0", "127.0.0.1:8084", &b"D:"[..]),
        ("[::1]:8087", "[::6]:0", "[::1]:8087", &b"G:"[..]),
    ] {
        let before = on.counts();
        let server = ns.spawn(app(listen, tag));
        let packets = lo_packets(&ns);
        ns.spawn(move || {
            let mut s = connect(from, to);
            exchange(&mut s, tag, 500);
        })
        .join()
        .expect("the client");
        server.join().expect("the app");
        let after = on.counts();
        assert_eq!(after.paired - before.paired, 2, "{to}: {after:?}");
        assert!(after.redirected - before.redirected >= 1_000, "{to}: {after:?}");
        assert!(lo_packets(&ns) - packets < 50, "{to}: the exchange crossed lo");
    }
}

#[test]
fn detaching_waits_for_paired_connections_and_leaves_late_ones_on_tcp() {
    let on = Attached::new("detach");
    let ns = netns();
    let server = ns.spawn(app("127.0.0.1:8085", b"E:"));
    let (opened, close) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let client = ns.spawn(move || {
        let mut s = connect("127.0.0.6:0", "127.0.0.1:8085");
        exchange(&mut s, b"E:", 100);
        opened.0.send(()).unwrap();
        close.1.recv().unwrap();
        // Past the drain, the connection goes on over TCP.
        exchange(&mut s, b"E:", 100);
    });
    opened.1.recv().unwrap();
    let started = Instant::now();
    let left = redirect::detach(&on.0, &cgroup(), Duration::from_millis(500)).expect("detach");
    assert_eq!(left, 2, "both ends were still paired when the map went");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "detach waited for the drain"
    );
    close.0.send(()).unwrap();
    client.join().expect("the connection survives the detach");
    server.join().expect("the app");
    drop(on);

    // With nothing paired, detach does not wait.
    let on = Attached::new("detach-idle");
    let started = Instant::now();
    assert_eq!(
        redirect::detach(&on.0, &cgroup(), Duration::from_secs(10)).expect("detach"),
        0
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// An address outside the namespace (routed into a veth whose other end answers nothing).
const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

/// A pod (10.7.0.1, fd00:7::1) whose default routes lead into a veth (nothing answers there),
/// enrolled with its outbound port at `port` and port 9999 excluded.
fn enrolled_pod(on: &Attached, port: u16) -> Netns {
    let ns = netns();
    for args in [
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"][..],
        &["addr", "add", "10.7.0.1/24", "dev", "v0"],
        &["link", "set", "v0", "up"],
        &["link", "set", "v1", "up"],
        &["route", "add", "default", "dev", "v0"],
        &["-6", "addr", "add", "fd00:7::1/64", "dev", "v0", "nodad"],
        &["-6", "route", "add", "default", "dev", "v0"],
    ] {
        sh(&[&["ip", "-n", &ns.0][..], args].concat());
    }
    let enrollment = enroll::Capture {
        outbound_port: port,
        exclude_outbound: vec![9999],
        ..Default::default()
    };
    enroll::enroll(&on.0, &ns.path(), &enrollment).expect("enroll");
    ns
}

/// One outbound connection through the pod's sidecar listening on `listen`: the sidecar answers
/// with its SO_ORIGINAL_DST, then echoes 1,000 messages of the app, which `dial` connected.
/// Checks the programs' counts of it; returns the app's getpeername, the original destination
/// the sidecar saw, and whom it accepted.
fn through_sidecar(
    on: &Attached,
    ns: &Netns,
    listen: &'static str,
    dial: impl FnOnce() -> TcpStream + Send + 'static,
) -> (SocketAddr, String, SocketAddr) {
    let before = on.counts();
    let (bound, listening) = std::sync::mpsc::channel();
    let sidecar = ns.spawn(move || {
        let listener = TcpListener::bind(listen).expect("bind the sidecar");
        bound.send(()).unwrap();
        let (mut s, peer) = listener.accept().expect("accept");
        let socket = socket2::SockRef::from(&s);
        let dst = match peer {
            SocketAddr::V4(_) => socket.original_dst_v4(),
            SocketAddr::V6(_) => socket.original_dst_v6(),
        };
        let dst = dst.expect("SO_ORIGINAL_DST");
        s.write_all(format!("{}|", dst.as_socket().expect("an address")).as_bytes())
            .expect("write");
        let mut buf = vec![0; 1 << 16];
        loop {
            let n = Patient(&s).read(&mut buf).expect("read");
            if n == 0 {
                return peer;
            }
            s.write_all(b"S:").and_then(|()| s.write_all(&buf[..n])).expect("write");
        }
    });
    listening.recv().unwrap();
    let (peer, seen) = ns
        .spawn(|| {
            let mut s = dial();
            let peer = s.peer_addr().expect("getpeername");
            let mut seen = Vec::new();
            let mut byte = [0u8];
            while seen.last() != Some(&b'|') {
                Patient(&s).read_exact(&mut byte).expect("the sidecar's first words");
                seen.push(byte[0]);
            }
            exchange(&mut s, b"S:", 1_000);
            (peer, String::from_utf8_lossy(&seen).into_owned())
        })
        .join()
        .expect("the app");
    let from = sidecar.join().expect("the sidecar");
    // One connect redirected, both ends paired, every message and answer redirected.
    let after = on.counts();
    assert_eq!(after.connects - before.connects, 1, "{after:?}");
    assert_eq!(after.paired - before.paired, 2, "{after:?}");
    assert!(after.redirected - before.redirected >= 2_000, "{after:?}");
    (peer, seen, from)
}

#[test]
fn an_enrolled_pods_outbound_connects_reach_its_sidecar_with_the_original_destination() {
    let on = Attached::new("outbound");
    let ns = enrolled_pod(&on, 15101);
    let netns = ns.path();
    let (peer, seen, from) = through_sidecar(&on, &ns, "0.0.0.0:15101", || {
        TcpStream::connect(format!("{VIP}:80")).expect("connect to the VIP")
    });
    assert_eq!(seen, format!("{VIP}:80|"), "the sidecar's SO_ORIGINAL_DST");
    assert_eq!(peer.to_string(), format!("{VIP}:80"), "the app's getpeername");
    assert!(
        from.ip().is_loopback(),
        "the app reached the sidecar over loopback: {from}"
    );
    let after = on.counts();

    // Left to the capture rules: excluded ports, the pod's own address, loopback, the proxy's
    // own connects, and everything once unenrolled.
    let own = ns.spawn(|| TcpListener::bind("10.7.0.1:15102").expect("bind"));
    let own = own.join().unwrap();
    ns.spawn(move || {
        let quick = std::time::Duration::from_millis(200);
        let _ = TcpStream::connect_timeout(&format!("{VIP}:9999").parse().unwrap(), quick);
        let s = TcpStream::connect("10.7.0.1:15102").expect("the pod's own address");
        assert_eq!(s.peer_addr().unwrap().to_string(), "10.7.0.1:15102");
        // As the proxy (setresuid on this thread only).
        // SAFETY: changes this thread's credentials; the thread ends right after.
        assert_eq!(unsafe { libc::syscall(libc::SYS_setresuid, 1337, 1337, 1337) }, 0);
        let _ = TcpStream::connect_timeout(&format!("{VIP}:80").parse().unwrap(), quick);
    })
    .join()
    .expect("the other connects");
    drop(own);
    assert_eq!(
        on.counts().connects,
        after.connects,
        "a connect the rules leave alone was redirected"
    );
    enroll::unenroll(&on.0, &netns).expect("unenroll");
    ns.spawn(|| {
        let quick = std::time::Duration::from_millis(200);
        let _ = TcpStream::connect_timeout(&format!("{VIP}:80").parse().unwrap(), quick);
    })
    .join()
    .unwrap();
    assert_eq!(
        on.counts().connects,
        after.connects,
        "a connect after unenroll was redirected"
    );
}

/// Java and others dial IPv4 addresses on dual-stack IPv6 sockets (`::ffff:a.b.c.d`): the
/// packets are IPv4, which the IPv4 capture rules would take, so the connect goes to the sidecar
/// just the same, and the app still sees the mapped address it dialled.
#[test]
fn a_dual_stack_socket_dialling_ipv4_reaches_the_sidecar_too() {
    let on = Attached::new("outbound6");
    let ns = enrolled_pod(&on, 15103);
    let (peer, seen, from) = through_sidecar(&on, &ns, "0.0.0.0:15103", || {
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).expect("socket");
        socket.set_only_v6(false).expect("dual-stack");
        let mapped: SocketAddr = format!("[::ffff:{VIP}]:80").parse().unwrap();
        socket.connect(&mapped.into()).expect("connect to the VIP");
        socket.into()
    });
    assert_eq!(seen, format!("{VIP}:80|"), "the sidecar's SO_ORIGINAL_DST");
    assert_eq!(peer.to_string(), format!("[::ffff:{VIP}]:80"), "the app's getpeername");
    assert!(from.ip().is_loopback(), "over loopback: {from}");
}

/// An IPv6 Service: the connect goes to the sidecar's `[::1]:<outbound port>`, which reads the
/// VIP with IP6T_SO_ORIGINAL_DST, as it would after the IPv6 capture rules' REDIRECT.
#[test]
fn an_enrolled_pods_ipv6_connects_reach_its_sidecar_with_the_original_destination() {
    let on = Attached::new("outbound-v6");
    let ns = enrolled_pod(&on, 15104);
    let (peer, seen, from) = through_sidecar(&on, &ns, "[::]:15104", || {
        TcpStream::connect(format!("[{VIP6}]:80")).expect("connect to the VIP")
    });
    assert_eq!(seen, format!("[{VIP6}]:80|"), "the sidecar's IP6T_SO_ORIGINAL_DST");
    assert_eq!(peer.to_string(), format!("[{VIP6}]:80"), "the app's getpeername");
    assert_eq!(from.ip().to_string(), "::1", "over loopback");
    let after = on.counts();

    // Left to the capture rules: an excluded port, the pod's own address, loopback.
    let own = ns.spawn(|| TcpListener::bind("[fd00:7::1]:15105").expect("bind"));
    let own = own.join().unwrap();
    ns.spawn(move || {
        let quick = std::time::Duration::from_millis(200);
        let _ = TcpStream::connect_timeout(&format!("[{VIP6}]:9999").parse().unwrap(), quick);
        let s = TcpStream::connect("[fd00:7::1]:15105").expect("the pod's own address");
        assert_eq!(s.peer_addr().unwrap().to_string(), "[fd00:7::1]:15105");
        let _ = TcpStream::connect_timeout(&"[::1]:15106".parse().unwrap(), quick);
    })
    .join()
    .expect("the other connects");
    drop(own);
    assert_eq!(
        on.counts().connects,
        after.connects,
        "a connect the rules leave alone was redirected"
    );
}

/// A pod with several interfaces' worth of addresses enrolls, and a connect to any of its own
/// addresses stays with the capture rules.
#[test]
fn a_pod_with_many_addresses_enrolls_and_keeps_its_own() {
    let on = Attached::new("many");
    let ns = netns();
    sh(&[
        "ip", "-n", &ns.0, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ]);
    for i in 1..=6 {
        sh(&["ip", "-n", &ns.0, "addr", "add", &format!("10.7.0.{i}/24"), "dev", "v0"]);
        sh(&[
            "ip",
            "-n",
            &ns.0,
            "-6",
            "addr",
            "add",
            &format!("fd00:7::{i}/64"),
            "dev",
            "v0",
            "nodad",
        ]);
    }
    sh(&["ip", "-n", &ns.0, "link", "set", "v0", "up"]);
    let enrollment = enroll::Capture {
        outbound_port: 15107,
        ..Default::default()
    };
    enroll::enroll(&on.0, &ns.path(), &enrollment).expect("enroll a pod with 7 IPv6 and 6 IPv4 addresses");
    let before = on.counts();
    ns.spawn(|| {
        for own in ["10.7.0.6:15108", "[fd00:7::6]:15108"] {
            let listener = TcpListener::bind(own).expect("bind");
            let s = TcpStream::connect(own).expect("the pod's own address");
            assert_eq!(s.peer_addr().unwrap(), listener.local_addr().unwrap());
        }
    })
    .join()
    .expect("the connects");
    assert_eq!(
        on.counts().connects,
        before.connects,
        "a connect to the pod's own address was redirected"
    );
}

#[test]
fn a_failed_attach_leaves_nothing_behind() {
    let dir = PathBuf::from(format!("/sys/fs/bpf/ferrum-test-failed-{}", std::process::id()));
    let err = redirect::attach(&dir, std::path::Path::new("/nonexistent-cgroup")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent-cgroup"), "{err}");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

/// An upgrade: an agent with other programs takes the older ones off the cgroup and puts its
/// own on; connections the older ones paired keep being redirected through the older socket
/// map, which goes once they have closed.
/// The first released agent's programs (`tests/redirect-v1.bpf.c`: IPv4 only, smaller keys).
static FIRST_AGENT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-v1.bpf.o"));

/// From the first released agent to this one: its connection stays redirected by its own map,
/// which is counted (whatever its key size) and released once that connection closes.
#[test]
fn an_upgrade_replaces_the_older_programs_and_keeps_their_paired_connections() {
    let turn = turn();
    let dir = PathBuf::from(format!("/sys/fs/bpf/ferrum-test-upgrade-{}", std::process::id()));
    let older = dir.join("0ld");
    assert_eq!(
        redirect::attach_as(&dir, &cgroup(), "0ld", FIRST_AGENT).unwrap(),
        redirect::Attached::Now
    );
    // Detaches every version on drop.
    let on = Attached(dir.clone(), turn);
    let ns = netns();
    let old_app = ns.spawn(app("127.0.0.1:8080", b"A:"));
    let (old_conn, exchanged) = std::sync::mpsc::channel::<TcpStream>();
    let old_client = ns.spawn(move || {
        let mut s = connect("127.0.0.6:0", "127.0.0.1:8080");
        exchange(&mut s, b"A:", 100);
        old_conn.send(s).unwrap();
    });
    old_client.join().unwrap();
    let mut old = exchanged.recv().unwrap();

    assert_eq!(redirect::attach(&dir, &cgroup()).unwrap(), redirect::Attached::Replaced);
    assert_eq!(redirect::attach(&dir, &cgroup()).unwrap(), redirect::Attached::Already);
    // The older connection is still redirected (no packets on lo), by the older map.
    let lo_before = lo_packets(&ns);
    exchange(&mut old, b"A:", 1_000);
    let lo = lo_packets(&ns) - lo_before;
    assert!(
        lo < 50,
        "{lo} packets on lo for 1,000 exchanges on the older connection"
    );
    // A new connection is paired by the new programs.
    let before = on.counts();
    let new_app = ns.spawn(app("127.0.0.1:8081", b"B:"));
    ns.spawn(|| {
        let mut s = connect("127.0.0.6:0", "127.0.0.1:8081");
        exchange(&mut s, b"B:", 500);
    })
    .join()
    .unwrap();
    new_app.join().unwrap();
    let after = on.counts();
    assert_eq!(after.paired - before.paired, 2, "both ends paired by the new version");
    assert!(after.redirected - before.redirected >= 1_000, "{after:?}");

    // The older map stays while its connection is open, and goes once it has closed.
    assert_eq!(redirect::release_retired(&dir, false).unwrap(), 0);
    assert!(older.join("pairs").exists(), "released with a connection still paired");
    old.shutdown(Shutdown::Write).unwrap();
    let mut bye = Vec::new();
    Patient(&old).read_to_end(&mut bye).unwrap();
    assert!(bye.ends_with(b"bye"));
    old_app.join().unwrap();
    drop(old);
    let deadline = Instant::now() + Duration::from_secs(5);
    while older.exists() {
        redirect::release_retired(&dir, false).unwrap();
        assert!(Instant::now() < deadline, "the older map outlived its connections");
        thread::sleep(Duration::from_millis(50));
    }
}
