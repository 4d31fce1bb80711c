//! What the agent needs of the host beyond aya: the cgroup v2 and bpffs mounts, and the one
//! `bpf(2)` call aya 0.14 does not make (a cgroup getsockopt attachment that outlives us), and
//! finding pods' network namespaces in `/proc`.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::redirect::{Error, io};

/// The oldest kernel the programs load on: `bpf_get_netns_cookie` from `sk_msg` (5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Refuses a kernel older than [`MIN_KERNEL`] with a message that says so (the verifier's own
/// refusal would name an unknown helper).
pub fn check_kernel() -> Result<(), Error> {
    // SAFETY: a C struct of byte arrays, for which all zeroes is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is valid for the kernel to write.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(io("asking", Path::new("uname"), std::io::Error::last_os_error()));
    }
    // SAFETY: uname NUL-terminates `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    match kernel_version(&release) {
        Some(v) if v < MIN_KERNEL => Err(Error::Kernel(release)),
        _ => Ok(()),
    }
}

/// (major, minor) of a kernel release such as `6.1.0-18-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
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
pub(crate) fn mount_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let at = pin_dir.parent().unwrap_or(pin_dir);
    match mounted("bpf", Some(at))? {
        Some(_) => Ok(()),
        None => mount("bpf", at),
    }
}

// uapi linux/bpf.h: commands, the getsockopt attach point, and the flag that lets other
// programs share the cgroup hook.
pub(crate) const BPF_PROG_ATTACH: libc::c_long = 8;
pub(crate) const BPF_PROG_DETACH: libc::c_long = 9;
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

pub(crate) fn prog_attach(cmd: libc::c_long, cgroup: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
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

/// A pod's network namespace as `/proc` shows it: a path to open it by, and its inode (which
/// changes if the kubelet ever remakes the pod's sandbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetns {
    pub path: PathBuf,
    pub inode: u64,
}

/// The network namespaces of the pods whose processes `proc_root` shows, by pod UID. The kubelet
/// puts every container of a pod in a cgroup named for the pod's UID (`pod<uid>`, with `_` for
/// `-` under the systemd driver) whatever the runtime and cgroup version; what shares the
/// agent's namespace — the host's: the agent runs on the host network — is left out.
pub fn pod_namespaces(proc_root: &Path) -> std::io::Result<HashMap<String, PodNetns>> {
    let host = fs::metadata(proc_root.join("self/ns/net"))?.ino();
    let mut found = HashMap::new();
    for entry in fs::read_dir(proc_root)?.flatten() {
        if !entry.file_name().as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        // Processes come and go while we read: what cannot be read is skipped.
        let Ok(cgroup) = fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        let Some(uid) = pod_uid(&cgroup) else { continue };
        if found.contains_key(&uid) {
            continue;
        }
        let path = entry.path().join("ns/net");
        match fs::metadata(&path) {
            Ok(m) if m.ino() != host => {
                found.insert(uid, PodNetns { path, inode: m.ino() });
            }
            _ => {}
        }
    }
    Ok(found)
}

/// The pod UID in a `/proc/PID/cgroup`, with dashes.
fn pod_uid(cgroup: &str) -> Option<String> {
    cgroup.match_indices("pod").find_map(|(at, _)| {
        let uid = cgroup.get(at + 3..at + 3 + 36)?;
        let shaped = uid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-' || c == '_',
            _ => c.is_ascii_hexdigit(),
        });
        shaped.then(|| uid.replace('_', "-"))
    })
}

#[cfg(test)]
mod tests {
    use super::{kernel_version, pod_uid};

    #[test]
    fn kernel_releases_are_read() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.15.0-1051-azure"), Some((5, 15)));
        assert_eq!(kernel_version("4.19.91"), Some((4, 19)));
        assert!(kernel_version("5.14.0-362.el9").unwrap() < super::MIN_KERNEL);
        assert_eq!(kernel_version("weird"), None);
    }

    #[test]
    fn pod_uids_are_read_from_every_cgroup_layout() {
        let uid = "5f1c2a9e-3b7d-4c1e-9a0f-1234567890ab";
        for line in [
            // cgroup v2, systemd driver (containerd, CRI-O)
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5f1c2a9e_3b7d_4c1e_9a0f_1234567890ab.slice/cri-containerd-0123.scope\n",
            // cgroupfs driver
            "0::/kubepods/besteffort/pod5f1c2a9e-3b7d-4c1e-9a0f-1234567890ab/0123abcd\n",
            // cgroup v1 lines
            "12:memory:/kubepods/pod5f1c2a9e-3b7d-4c1e-9a0f-1234567890ab/abc\n1:name=systemd:/\n",
        ] {
            assert_eq!(pod_uid(line).as_deref(), Some(uid), "{line}");
        }
        for line in [
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "0::/podman-pod-xyz\n",
            "0::/\n",
        ] {
            assert_eq!(pod_uid(line), None, "{line}");
        }
    }
}
