//! Sockmap redirection of the sidecar's loopback hops (see `ebpf/redirect.bpf.c`): `attach`,
//! `detach` and the counters (enrolling pods: `crate::enroll`).

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray};
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSockopt, CgroupSockoptAttachType, Program, SkMsg};
use aya::{
    Ebpf,
    maps::{SockHash, sock::SockMapFd},
};

use crate::host::{BPF_PROG_ATTACH, BPF_PROG_DETACH, mount_bpffs, prog_attach};

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
    #[error("kernel {0} is too old: the programs need Linux 5.15 or later")]
    Kernel(String),
}

/// What `attach` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    Now,
    Already,
    /// Another version's programs were attached: taken off, this version's put on (the old
    /// version's paired connections keep its socket map until [`release_retired`]).
    Replaced,
}

/// The programs attached to the cgroup, each pinned under its own name; the socket pairer last,
/// its pin saying that everything is attached.
const CGROUP_PROGRAMS: [&str; 5] = [
    "redirect_outbound",
    "redirect_outbound6",
    "original_peer",
    "original_peer6",
    "pair_sockets",
];

/// The maps pinned beside them: what `detach`, `enroll` and `counts` open.
const PINNED_MAPS: [&str; 3] = ["pairs", "counts", "enrolled"];

/// The programs' version, a digest of the object: an agent with other programs replaces what
/// an older agent attached rather than keeping it (an upgrade), and finds its maps with the
/// layout it expects.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(OBJECT)[..6])
    })
}

/// Where this version's maps and links are pinned: `<pin_dir>/<version>`.
pub fn pins(pin_dir: &Path) -> PathBuf {
    pin_dir.join(version())
}

/// Other versions' pin directories: subdirectories of `pin_dir` but `version`'s, and `pin_dir`
/// itself when pins sit directly in it (the first agent's layout).
fn other_versions(pin_dir: &Path, version: &str) -> Result<Vec<PathBuf>, Error> {
    let entries = match fs::read_dir(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(|source| io("reading", pin_dir, source))?,
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != version))
        .collect();
    if PINNED_MAPS.iter().any(|m| pin_dir.join(m).exists()) {
        found.push(pin_dir.to_path_buf());
    }
    Ok(found)
}

/// Loads the programs, pins the socket map, the enrolled pods and the counters, attaches the
/// message redirector to the socket map and the rest to `cgroup` (every socket and connect
/// below it). Idempotent: this version's programs, once pinned, are left as they are; another
/// version's are taken off the cgroup first.
pub fn attach(pin_dir: &Path, cgroup: &Path) -> Result<Attached, Error> {
    attach_as(pin_dir, cgroup, version(), OBJECT)
}

/// [`attach`] of another `object` as version `version`: what an upgrade drill needs (an older
/// agent's programs).
#[doc(hidden)]
pub fn attach_as(pin_dir: &Path, cgroup: &Path, version: &str, object: &[u8]) -> Result<Attached, Error> {
    let here = pin_dir.join(version);
    if here.join("pair_sockets").exists() {
        return Ok(Attached::Already);
    }
    crate::host::check_kernel()?;
    mount_bpffs(pin_dir)?;
    let older = other_versions(pin_dir, version)?;
    for dir in &older {
        detach_programs(dir, cgroup)?;
    }
    // All or nothing: what a failed attach pinned or attached is taken off again.
    attach_all(&here, cgroup, object)
        .inspect_err(|_| {
            let _ = detach_programs(&here, cgroup).and_then(|()| unpin_maps(&here));
            let _ = fs::remove_dir(pin_dir);
        })
        .map(|()| {
            if older.is_empty() {
                Attached::Now
            } else {
                Attached::Replaced
            }
        })
}

/// Unpins the socket maps of other versions (whose programs `attach` took off) once no
/// connection is paired in them any more — or at once, if `now`. Returns how many sockets were
/// still paired in the maps released.
pub fn release_retired(pin_dir: &Path, now: bool) -> Result<usize, Error> {
    let mut dropped = 0;
    for dir in other_versions(pin_dir, version())? {
        let left = paired_now(&dir)?;
        if left == 0 || now {
            unpin_maps(&dir)?;
            dropped += left;
        }
    }
    Ok(dropped)
}

fn attach_all(dir: &Path, cgroup: &Path, object: &[u8]) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| io("creating", dir, source))?;
    let mut ebpf = Ebpf::load(object)?;
    for name in PINNED_MAPS {
        let map = ebpf.map(name).ok_or(Error::Missing(name))?;
        let path = dir.join(name);
        let _ = fs::remove_file(&path); // left by an attach that failed halfway
        map.pin(&path).map_err(|source| Error::Pin { path, source })?;
    }
    let map_fd = pairs_fd(&ebpf)?;

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
    let sockopt_pin = dir.join(SOCKOPT_PROGRAM);
    // Left attached by an attach that failed halfway: take it off, or it would stay twice.
    detach_sockopt(&sockopt_pin, cgroup)?;
    attach_sockopt(&mut ebpf, &sockopt_pin, &cgroup_dir)?;
    for name in CGROUP_PROGRAMS {
        // An older version's object lacks the newer programs (the pairer it always has).
        if name != "pair_sockets" && ebpf.program(name).is_none() {
            continue;
        }
        let path = dir.join(name);
        let _ = fs::remove_file(&path);
        let link = attach_to_cgroup(&mut ebpf, name, &cgroup_dir)?;
        link.pin(&path).map_err(|source| Error::Pin { path, source })?;
    }
    Ok(())
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

/// Unpins everything `attach` pinned (of every version). New connections stop being paired at
/// once; the socket maps are kept until the connections in them have closed, or `drain` has
/// passed: paired connections still open then fall back to TCP, losing bytes redirected to them
/// and not yet read. Returns how many sockets were still paired when the maps went.
pub fn detach(pin_dir: &Path, cgroup: &Path, drain: Duration) -> Result<usize, Error> {
    let mut dirs = other_versions(pin_dir, version())?;
    dirs.push(pins(pin_dir));
    for dir in &dirs {
        detach_programs(dir, cgroup)?;
    }
    let deadline = Instant::now() + drain;
    let paired = || dirs.iter().try_fold(0, |n, d| Ok::<_, Error>(n + paired_now(d)?));
    let mut left = paired()?;
    while left > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = paired()?;
    }
    for dir in &dirs {
        unpin_maps(dir)?;
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(left)
}

/// Takes the programs pinned in `dir` off the cgroup (the socket map's redirector stays with
/// the map).
fn detach_programs(dir: &Path, cgroup: &Path) -> Result<(), Error> {
    for name in CGROUP_PROGRAMS.iter().rev() {
        unpin(&dir.join(name))?;
    }
    detach_sockopt(&dir.join(SOCKOPT_PROGRAM), cgroup)
}

/// Unpins the maps in `dir` and removes it if that leaves it empty (the pin directory itself,
/// in the first layout, may hold other versions).
fn unpin_maps(dir: &Path) -> Result<(), Error> {
    for name in PINNED_MAPS {
        unpin(&dir.join(name))?;
    }
    let _ = fs::remove_dir(dir);
    Ok(())
}

/// Sockets in the socket map pinned in `dir` now (0 when none is) — whatever the key size of
/// the version that pinned it (an upgrade counts the older version's map).
fn paired_now(dir: &Path) -> Result<usize, Error> {
    let path = dir.join("pairs");
    if !path.exists() {
        return Ok(0);
    }
    let map = |source| Error::Map { name: "pairs", source };
    let data = MapData::from_pin(&path).map_err(map)?;
    match data.info().map_err(map)?.key_size() {
        PAIR_KEY_V1 => count_keys::<PAIR_KEY_V1_BYTES>(data),
        _ => count_keys::<PAIR_KEY_BYTES>(data),
    }
}

/// The loaded object's socket map, whatever its key size (an older version's are smaller).
fn pairs_fd(ebpf: &Ebpf) -> Result<SockMapFd, Error> {
    let map = ebpf.map("pairs").ok_or(Error::Missing("pairs"))?;
    let fd = match SockHash::<_, [u8; PAIR_KEY_BYTES]>::try_from(map) {
        Ok(pairs) => pairs.fd().try_clone(),
        Err(_) => SockHash::<_, [u8; PAIR_KEY_V1_BYTES]>::try_from(map)
            .map_err(|source| Error::Map { name: "pairs", source })?
            .fd()
            .try_clone(),
    };
    fd.map_err(|source| io("duplicating", Path::new("pairs"), source))
}

/// `struct pair_key` of redirect.bpf.c; the first agent's (IPv4 only) was smaller.
const PAIR_KEY_BYTES: usize = 40;
const PAIR_KEY_V1_BYTES: usize = 24;
const PAIR_KEY_V1: u32 = PAIR_KEY_V1_BYTES as u32;

fn count_keys<const N: usize>(data: MapData) -> Result<usize, Error> {
    let map = |source| Error::Map { name: "pairs", source };
    let pairs: SockHash<_, [u8; N]> = aya::maps::Map::SockHash(data).try_into().map_err(map)?;
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
    let path = pins(pin_dir).join("counts");
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

pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
