//! Sockmap redirection of the sidecar's loopback hops (see `ebpf/redirect.bpf.c`): `attach`,
//! `detach`, `enroll` (a pod's outbound connects redirected to its sidecar) and the counters.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::HashMap;
use aya::maps::{MapData, PerCpuArray};
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSockopt, CgroupSockoptAttachType, Program, SkMsg};
use aya::{Ebpf, maps::SockHash};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// The compiled programs (`build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.bpf.o"));

/// Where the agent pins its maps and links unless told otherwise.
pub const PIN_DIR: &str = "/sys/fs/bpf/ferrum";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/mounts)")]
    NoCgroup2,
    #[error("the socket pairer's link: {0}")]
    Link(#[from] LinkError),
    #[error("{what}: at most {max} ({found} given)")]
    TooMany {
        what: &'static str,
        max: usize,
        found: usize,
    },
    #[error("{0} is missing from the eBPF object")]
    Missing(&'static str),
}

/// What `attach` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    Now,
    Already,
}

/// The programs attached to the cgroup, each pinned under its own name; the socket pairer last,
/// its pin saying that everything is attached.
const CGROUP_PROGRAMS: [&str; 3] = ["redirect_outbound", "original_peer", "pair_sockets"];

/// The maps pinned beside them: what `detach`, `enroll` and `counts` open.
const PINNED_MAPS: [&str; 3] = ["pairs", "counts", "enrolled"];

/// Loads the programs, pins the socket map, the enrolled pods and the counters, attaches the
/// message redirector to the socket map and the rest to `cgroup` (every socket and connect
/// below it). Idempotent: programs already pinned in `pin_dir` are left as they are.
pub fn attach(pin_dir: &Path, cgroup: &Path) -> Result<Attached, Error> {
    if pin_dir.join("pair_sockets").exists() {
        return Ok(Attached::Already);
    }
    mount_bpffs(pin_dir)?;
    fs::create_dir_all(pin_dir).map_err(|source| io("creating", pin_dir, source))?;
    let mut ebpf = Ebpf::load(OBJECT)?;
    for name in PINNED_MAPS {
        let map = ebpf.map(name).ok_or(Error::Missing(name))?;
        let path = pin_dir.join(name);
        let _ = fs::remove_file(&path); // left by an attach that failed halfway
        map.pin(&path).map_err(|source| Error::Pin { path, source })?;
    }
    let pairs: SockHash<_, [u8; 24]> = SockHash::try_from(ebpf.map("pairs").ok_or(Error::Missing("pairs"))?)
        .map_err(|source| Error::Map { name: "pairs", source })?;
    let map_fd = pairs
        .fd()
        .try_clone()
        .map_err(|source| io("duplicating", Path::new("pairs"), source))?;

    let program = |source| Error::Program {
        name: "redirect_to_peer",
        source,
    };
    let msg: &mut SkMsg = ebpf
        .program_mut("redirect_to_peer")
        .ok_or(Error::Missing("redirect_to_peer"))?
        .try_into()
        .map_err(program)?;
    msg.load().map_err(program)?;
    let id = msg.attach(&map_fd).map_err(program)?;
    // The attachment belongs to the pinned map from now on; dropping the link would detach it.
    std::mem::forget(msg.take_link(id).map_err(program)?);

    let cgroup_dir = fs::File::open(cgroup).map_err(|source| io("opening", cgroup, source))?;
    attach_sockopt(&mut ebpf, &pin_dir.join(SOCKOPT_PROGRAM), &cgroup_dir)?;
    for name in CGROUP_PROGRAMS {
        let path = pin_dir.join(name);
        let _ = fs::remove_file(&path);
        let link = attach_to_cgroup(&mut ebpf, name, &cgroup_dir)?;
        link.pin(&path).map_err(|source| Error::Pin { path, source })?;
    }
    Ok(Attached::Now)
}

/// Loads program `name` and attaches it to the cgroup (a link, so it can be pinned).
fn attach_to_cgroup(ebpf: &mut Ebpf, name: &'static str, cgroup: &fs::File) -> Result<FdLink, Error> {
    let program = |source| Error::Program { name, source };
    let mode = CgroupAttachMode::Single;
    let link = match ebpf.program_mut(name).ok_or(Error::Missing(name))? {
        Program::SockOps(p) => {
            p.load().map_err(program)?;
            let id = p.attach(cgroup, mode).map_err(program)?;
            p.take_link(id).map_err(program)?.try_into()?
        }
        Program::CgroupSockAddr(p) => {
            p.load().map_err(program)?;
            let id = p.attach(cgroup, mode).map_err(program)?;
            p.take_link(id).map_err(program)?.try_into()?
        }
        _ => return Err(Error::Missing(name)),
    };
    Ok(link)
}

/// The SO_ORIGINAL_DST program. aya 0.14 cannot pin a cgroup sockopt link, so it is attached the
/// older way (an attachment the cgroup keeps, no link) and the program pinned, for `detach`.
const SOCKOPT_PROGRAM: &str = "original_dst";

fn attach_sockopt(ebpf: &mut Ebpf, pin: &Path, cgroup: &fs::File) -> Result<(), Error> {
    let program = |source| Error::Program {
        name: SOCKOPT_PROGRAM,
        source,
    };
    let p: &mut CgroupSockopt = ebpf
        .program_mut(SOCKOPT_PROGRAM)
        .ok_or(Error::Missing(SOCKOPT_PROGRAM))?
        .try_into()
        .map_err(program)?;
    p.load().map_err(program)?;
    let _ = fs::remove_file(pin);
    p.pin(pin).map_err(|source| Error::Pin {
        path: pin.to_path_buf(),
        source,
    })?;
    let fd = p.fd().map_err(program)?.as_fd();
    prog_attach(BPF_PROG_ATTACH, cgroup.as_fd(), fd)
        .map_err(|source| io("attaching to", Path::new("the cgroup"), source))
}

/// Takes the pinned SO_ORIGINAL_DST program off `cgroup` and unpins it.
fn detach_sockopt(pin: &Path, cgroup: &Path) -> Result<(), Error> {
    if !pin.exists() {
        return Ok(());
    }
    let program = |source| Error::Program {
        name: SOCKOPT_PROGRAM,
        source,
    };
    let p = CgroupSockopt::from_pin(pin, CgroupSockoptAttachType::Get).map_err(program)?;
    let dir = fs::File::open(cgroup).map_err(|source| io("opening", cgroup, source))?;
    match prog_attach(BPF_PROG_DETACH, dir.as_fd(), p.fd().map_err(program)?.as_fd()) {
        // Not attached there (a half-done attach): nothing to take off.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        r => r.map_err(|source| io("detaching from", cgroup, source))?,
    }
    unpin(pin)
}

// uapi linux/bpf.h: commands, the getsockopt attach point, and the flag that lets other
// programs share the cgroup hook.
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_CGROUP_GETSOCKOPT: u32 = 21;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The `bpf(2)` attribute for attach and detach (the leading fields of `union bpf_attr`).
#[repr(C)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn prog_attach(cmd: libc::c_long, cgroup: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let attr = AttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_GETSOCKOPT,
        attach_flags: if cmd == BPF_PROG_ATTACH { BPF_F_ALLOW_MULTI } else { 0 },
        replace_bpf_fd: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for these commands, of the size given.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw const attr, std::mem::size_of::<AttachAttr>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Unpins everything `attach` pinned. New connections stop being paired at once; the socket map
/// is kept until the connections in it have closed, or `drain` has passed: paired connections
/// still open then fall back to TCP, losing bytes redirected to them and not yet read. Returns
/// how many sockets were still paired when the map went.
pub fn detach(pin_dir: &Path, cgroup: &Path, drain: Duration) -> Result<usize, Error> {
    for name in CGROUP_PROGRAMS.iter().rev() {
        unpin(&pin_dir.join(name))?;
    }
    detach_sockopt(&pin_dir.join(SOCKOPT_PROGRAM), cgroup)?;
    let deadline = Instant::now() + drain;
    let mut left = paired_now(pin_dir)?;
    while left > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = paired_now(pin_dir)?;
    }
    for name in PINNED_MAPS {
        unpin(&pin_dir.join(name))?;
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(left)
}

/// Sockets in the pinned map now (0 when nothing is pinned).
fn paired_now(pin_dir: &Path) -> Result<usize, Error> {
    let path = pin_dir.join("pairs");
    if !path.exists() {
        return Ok(0);
    }
    let map = |source| Error::Map { name: "pairs", source };
    let data = MapData::from_pin(&path).map_err(map)?;
    let pairs: SockHash<_, [u8; 24]> = aya::maps::Map::SockHash(data).try_into().map_err(map)?;
    Ok(pairs.keys().count())
}

fn unpin(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("unpinning", path, e)),
        _ => Ok(()),
    }
}

/// The counters of the attached programs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Sockets put into the map (both ends of each paired connection).
    pub paired: u64,
    /// Writes queued straight onto the peer socket.
    pub redirected: u64,
    /// Writes on paired sockets that went over TCP (the peer was not paired yet, or had closed).
    pub passed: u64,
    /// Outbound connects of enrolled pods sent to their sidecar.
    pub connects: u64,
}

pub fn counts(pin_dir: &Path) -> Result<Counts, Error> {
    let path = pin_dir.join("counts");
    let data = MapData::from_pin(&path).map_err(|source| Error::Map { name: "counts", source })?;
    let map = aya::maps::Map::PerCpuArray(data);
    let counts: PerCpuArray<_, u64> = map.try_into().map_err(|source| Error::Map { name: "counts", source })?;
    let sum = |i: u32| -> Result<u64, Error> {
        let v = counts
            .get(&i, 0)
            .map_err(|source| Error::Map { name: "counts", source })?;
        Ok(v.iter().sum())
    };
    // Indices as `enum count` in redirect.bpf.c.
    Ok(Counts {
        redirected: sum(0)?,
        passed: sum(1)?,
        paired: sum(2)?,
        connects: sum(3)?,
    })
}

/// What a pod's capture rules say, for `enroll` (as `ferrum-dp init-iptables` was given).
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    /// Outbound destination ports never captured.
    pub exclude_outbound: Vec<u16>,
}

impl Default for Enrollment {
    fn default() -> Self {
        Enrollment {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            exclude_outbound: Vec::new(),
        }
    }
}

/// `struct capture` in redirect.bpf.c.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CaptureValue {
    proxy_uid: u32,
    proxy_gid: u32,
    outbound_port: u32,
    addrs: [u32; 4],
    excluded: [u32; 16],
}

// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for CaptureValue {}

/// Enrolls the pod whose network namespace is `netns` (a path such as /run/netns/NAME or
/// /proc/PID/ns/net): its processes' TCP connects (IPv4; but the proxy's own, loopback, its
/// own addresses and the excluded ports) go straight to its sidecar's outbound port, and the
/// two ends are paired. The capture rules stay as they are for everything else.
pub fn enroll(pin_dir: &Path, netns: &Path, e: &Enrollment) -> Result<(), Error> {
    let (cookie, addrs) = in_netns(netns, || Ok((netns_cookie()?, own_ipv4()?)))?;
    let too_many = |what, max, found| Error::TooMany { what, max, found };
    let mut value = CaptureValue {
        proxy_uid: e.proxy_uid,
        proxy_gid: e.proxy_gid,
        outbound_port: e.outbound_port.into(),
        addrs: [0; 4],
        excluded: [0; 16],
    };
    if addrs.len() > value.addrs.len() {
        return Err(too_many("addresses of the pod", value.addrs.len(), addrs.len()));
    }
    if e.exclude_outbound.len() > value.excluded.len() {
        return Err(too_many(
            "excluded outbound ports",
            value.excluded.len(),
            e.exclude_outbound.len(),
        ));
    }
    for (slot, ip) in value.addrs.iter_mut().zip(&addrs) {
        *slot = u32::from_ne_bytes(ip.octets());
    }
    for (slot, port) in value.excluded.iter_mut().zip(&e.exclude_outbound) {
        *slot = (*port).into();
    }
    enrolled(pin_dir)?
        .insert(cookie, value, 0)
        .map_err(|source| Error::Map {
            name: "enrolled",
            source,
        })
}

/// Undoes `enroll`: new connects of the pod go through the capture rules again.
pub fn unenroll(pin_dir: &Path, netns: &Path) -> Result<(), Error> {
    let cookie = in_netns(netns, netns_cookie)?;
    match enrolled(pin_dir)?.remove(&cookie) {
        Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
        Err(source) => Err(Error::Map {
            name: "enrolled",
            source,
        }),
    }
}

fn enrolled(pin_dir: &Path) -> Result<HashMap<MapData, u64, CaptureValue>, Error> {
    let map = |source| Error::Map {
        name: "enrolled",
        source,
    };
    let data = MapData::from_pin(pin_dir.join("enrolled")).map_err(map)?;
    aya::maps::Map::HashMap(data).try_into().map_err(map)
}

/// Runs `f` on a thread inside network namespace `netns` (setns changes only that thread's).
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> std::io::Result<T> + Send) -> Result<T, Error> {
    let ns = fs::File::open(netns).map_err(|source| io("opening", netns, source))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a valid namespace fd; CLONE_NEWNET affects the calling thread only.
                if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .expect("the namespace thread does not panic")
    })
    .map_err(|source| io("entering", netns, source))
}

/// The kernel's cookie for the calling thread's network namespace (what the programs key on).
fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71; // asm-generic/socket.h, Linux 5.14
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let (mut cookie, mut len) = (0u64, std::mem::size_of::<u64>() as libc::socklen_t);
    // SAFETY: `cookie` and `len` are valid for the kernel to write.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The calling thread's namespace's IPv4 addresses, loopback aside.
fn own_ipv4() -> std::io::Result<Vec<std::net::Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut at = head;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned; ifa_addr, when set, points at a
        // sockaddr whose family says its type.
        unsafe {
            let a = (*at).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let v4 = *(a as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
                if !ip.is_loopback() && !addrs.contains(&ip) {
                    addrs.push(ip);
                }
            }
            at = (*at).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
}

/// Where the agent mounts the cgroup v2 hierarchy on a host that has none mounted (cgroup v1
/// only): every process is in its root all the same.
const CGROUP2_MOUNT: &str = "/run/ferrum/cgroup2";

/// The cgroup v2 root (the first cgroup2 mount, else one the agent mounts): attached there, the
/// programs see every socket of the node.
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    if let Some(at) = mounted("cgroup2", None)? {
        return Ok(at);
    }
    mount("cgroup2", Path::new(CGROUP2_MOUNT))?;
    Ok(PathBuf::from(CGROUP2_MOUNT))
}

/// The mount point of the first filesystem of type `fstype` (at `at`, if given).
fn mounted(fstype: &str, at: Option<&Path>) -> Result<Option<PathBuf>, Error> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|s| io("reading", Path::new("/proc/mounts"), s))?;
    Ok(mounts.lines().find_map(|l| {
        let f: Vec<_> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == fstype && at.is_none_or(|at| Path::new(f[1]) == at)).then(|| PathBuf::from(f[1]))
    }))
}

fn mount(fstype: &str, at: &Path) -> Result<(), Error> {
    fs::create_dir_all(at).map_err(|source| io("creating", at, source))?;
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).expect("a path without NUL");
    let fstype = std::ffi::CString::new(fstype).expect("no NUL");
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io("mounting", at, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Mounts bpffs on the parent of `pin_dir` unless one is mounted there.
fn mount_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let at = pin_dir.parent().unwrap_or(pin_dir);
    match mounted("bpf", Some(at))? {
        Some(_) => Ok(()),
        None => mount("bpf", at),
    }
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
