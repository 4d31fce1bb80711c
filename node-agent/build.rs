//! Compiles the eBPF programs in `../ebpf` with clang (`-target bpf`, BTF for the map
//! definitions); the binary embeds the object.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    // Relative to the package: clones sharing one target dir share this script's output, and an
    // absolute path would watch the file of whichever clone built last.
    compile("../ebpf/redirect.bpf.c", "redirect.bpf.o");
    // The first agent's programs, for the upgrade test (tests/redirect.rs).
    compile("tests/redirect-v1.bpf.c", "redirect-v1.bpf.o");
    println!("cargo:rerun-if-env-changed=CLANG");
}

/// Compiles `source` (relative to the package) into `$OUT_DIR/<object>`.
fn compile(source: &str, object: &str) {
    // The package's directory at run time (`env!` would bake in the clone this script was
    // compiled in).
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join(source);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(object);
    println!("cargo:rerun-if-changed={source}");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // The kernel's uapi headers include <asm/types.h>, which Debian keeps per architecture.
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let status = Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-Wall",
            "-Werror",
            "-I",
            &arch_include,
            "-c",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("running {clang} to build the eBPF programs (apt-get install clang libbpf-dev): {e}")
        });
    assert!(status.success(), "{clang} failed to compile {}", src.display());
}
