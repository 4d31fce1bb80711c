//! Enrolling a pod: its outbound connects redirected to its sidecar at connect() (the
//! `enrolled` map of `ebpf/redirect.bpf.c`, keyed by network namespace).

use std::fs;
use std::path::Path;

use aya::maps::{HashMap, MapData};

pub use ferrum_snapshot::mesh::Capture;

use crate::redirect::{Error, io};

/// `MAX_ADDRS` in redirect.bpf.c: a pod's own addresses per family (a dual-stack pod has ~3
/// IPv6 ones: its global, link-local and `::6`; each extra interface adds more).
const MAX_ADDRS: usize = 8;

/// `struct capture` in redirect.bpf.c.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CaptureValue {
    proxy_uid: u32,
    proxy_gid: u32,
    outbound_port: u32,
    addrs: [u32; MAX_ADDRS],
    /// Network byte order, word by word, as `struct addr`.
    addrs6: [[u32; 4]; MAX_ADDRS],
    excluded: [u32; 16],
}

// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for CaptureValue {}

/// Enrolls the pod whose network namespace is `netns` (a path such as /run/netns/NAME or
/// /proc/PID/ns/net): its processes' TCP connects (IPv4 and IPv6; but the proxy's own,
/// loopback, its own addresses and the excluded ports) go straight to its sidecar's outbound port, and the
/// two ends are paired. The capture rules stay as they are for everything else. Returns the
/// namespace's cookie, which names the enrollment (see [`forget`]).
pub fn enroll(pin_dir: &Path, netns: &Path, e: &Capture) -> Result<u64, Error> {
    let (cookie, own) = in_netns(netns, || Ok((netns_cookie()?, own_addresses()?)))?;
    let too_many = |what, max, found| Error::TooMany { what, max, found };
    let mut value = CaptureValue {
        proxy_uid: e.proxy_uid,
        proxy_gid: e.proxy_gid,
        outbound_port: e.outbound_port.into(),
        addrs: [0; MAX_ADDRS],
        addrs6: [[0; 4]; MAX_ADDRS],
        excluded: [0; 16],
    };
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for ip in own {
        match ip {
            std::net::IpAddr::V4(ip) => v4.push(u32::from_ne_bytes(ip.octets())),
            std::net::IpAddr::V6(ip) => v6.push(words(ip)),
        }
    }
    for (what, found) in [
        ("IPv4 addresses of the pod", v4.len()),
        ("IPv6 addresses of the pod", v6.len()),
    ] {
        if found > value.addrs.len() {
            return Err(too_many(what, value.addrs.len(), found));
        }
    }
    if e.exclude_outbound.len() > value.excluded.len() {
        return Err(too_many(
            "excluded outbound ports",
            value.excluded.len(),
            e.exclude_outbound.len(),
        ));
    }
    value.addrs[..v4.len()].copy_from_slice(&v4);
    value.addrs6[..v6.len()].copy_from_slice(&v6);
    for (slot, port) in value.excluded.iter_mut().zip(&e.exclude_outbound) {
        *slot = (*port).into();
    }
    enrolled(pin_dir)?
        .insert(cookie, value, 0)
        .map_err(|source| Error::Map {
            name: "enrolled",
            source,
        })?;
    Ok(cookie)
}

/// Undoes `enroll`: new connects of the pod go through the capture rules again.
pub fn unenroll(pin_dir: &Path, netns: &Path) -> Result<(), Error> {
    forget(pin_dir, in_netns(netns, netns_cookie)?)
}

/// Undoes the enrollment [`enroll`] returned `cookie` for — also after the namespace is gone
/// (cookies are never reused, so a stale one only takes a slot).
pub fn forget(pin_dir: &Path, cookie: u64) -> Result<(), Error> {
    match enrolled(pin_dir)?.remove(&cookie) {
        Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
        Err(source) => Err(Error::Map {
            name: "enrolled",
            source,
        }),
    }
}

/// The cookies of the enrolled namespaces.
pub fn cookies(pin_dir: &Path) -> Result<Vec<u64>, Error> {
    enrolled(pin_dir)?
        .keys()
        .collect::<Result<_, _>>()
        .map_err(|source| Error::Map {
            name: "enrolled",
            source,
        })
}

fn enrolled(pin_dir: &Path) -> Result<HashMap<MapData, u64, CaptureValue>, Error> {
    let map = |source| Error::Map {
        name: "enrolled",
        source,
    };
    let data = MapData::from_pin(crate::redirect::pins(pin_dir).join("enrolled")).map_err(map)?;
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

/// An IPv6 address as the programs hold it: four words in network byte order.
fn words(ip: std::net::Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// The calling thread's namespace's addresses, loopback aside.
fn own_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
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
        let ip = unsafe {
            let a = (*at).ifa_addr;
            at = (*at).ifa_next;
            if a.is_null() {
                continue;
            }
            match i32::from((*a).sa_family) {
                libc::AF_INET => {
                    let v4 = *(a as *const libc::sockaddr_in);
                    std::net::IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let v6 = *(a as *const libc::sockaddr_in6);
                    std::net::IpAddr::from(v6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        if !ip.is_loopback() && !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
}
