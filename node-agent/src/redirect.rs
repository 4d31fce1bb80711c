//! Sockmap redirection of the sidecar's inbound hop (see `ebpf/redirect.bpf.c`): `attach`,
//! `detach` and the counters.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray};
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::{Ebpf, maps::SockHash};

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
    #[error("{0} is missing from the eBPF object")]
    Missing(&'static str),
}

/// What `attach` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    Now,
    Already,
}

/// Loads the programs, pins the socket map and counters, attaches the message redirector to the
/// map and the socket pairer to `cgroup` (every socket below it). Idempotent: programs already
/// pinned in `pin_dir` are left as they are.
pub fn attach(pin_dir: &Path, cgroup: &Path) -> Result<Attached, Error> {
    let link_pin = pin_dir.join("pair_sockets");
    if link_pin.exists() {
        return Ok(Attached::Already);
    }
    mount_bpffs(pin_dir)?;
    fs::create_dir_all(pin_dir).map_err(|source| io("creating", pin_dir, source))?;
    let mut ebpf = Ebpf::load(OBJECT)?;
    for name in ["pairs", "counts"] {
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

    let program = |source| Error::Program {
        name: "pair_sockets",
        source,
    };
    let ops: &mut SockOps = ebpf
        .program_mut("pair_sockets")
        .ok_or(Error::Missing("pair_sockets"))?
        .try_into()
        .map_err(program)?;
    ops.load().map_err(program)?;
    let cgroup_dir = fs::File::open(cgroup).map_err(|source| io("opening", cgroup, source))?;
    let id = ops.attach(cgroup_dir, CgroupAttachMode::Single).map_err(program)?;
    let link: FdLink = ops.take_link(id).map_err(program)?.try_into()?;
    link.pin(&link_pin)
        .map_err(|source| Error::Pin { path: link_pin, source })?;
    Ok(Attached::Now)
}

/// Unpins everything `attach` pinned. New connections stop being paired at once; the socket map
/// is kept until the connections in it have closed, or `drain` has passed: paired connections
/// still open then fall back to TCP, losing bytes redirected to them and not yet read. Returns
/// how many sockets were still paired when the map went.
pub fn detach(pin_dir: &Path, drain: Duration) -> Result<usize, Error> {
    unpin(&pin_dir.join("pair_sockets"))?;
    let deadline = Instant::now() + drain;
    let mut left = paired_now(pin_dir)?;
    while left > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = paired_now(pin_dir)?;
    }
    for name in ["pairs", "counts"] {
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
    })
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
