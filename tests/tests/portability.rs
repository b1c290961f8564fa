//! Every kernel program of the built object passes this kernel's verifier,
//! and every map it declares can be created.
//!
//! The agent loads only what its config enables, so a program the verifier
//! of an older kernel refuses could hide until a user enables it. This test
//! loads them all, without attaching anything. `cargo xtask test --kernel`
//! runs it on Debian's 5.10, 6.1 and 6.12 (the verifier differs between
//! them: older ones lose bounds through stack spills and refuse reads of
//! stack slots written on another path); a refusal names the program and
//! ends with the tail of its verifier log.
use aya::{EbpfLoader, programs::Program};
use tarpit_tests::{env::repo_root, require_root};

/// Lines of verifier log shown per refused program: the refusal is at the end.
const LOG_TAIL: usize = 25;

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn load(program: &mut Program) -> Result<(), String> {
    let r = match program {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::SocketFilter(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkSkb(p) => p.load(),
        other => {
            return Err(format!(
                "program type {:?} is not loaded by this test: add it here",
                other.prog_type()
            ));
        }
    };
    r.map_err(|e| tail(&e.to_string(), LOG_TAIL))
}

#[test]
fn every_program_passes_this_kernels_verifier() {
    if !require_root() {
        return;
    }
    let path = repo_root().join("target/ebpf/bpfel-unknown-none/release/tarpit");
    let object = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (build it with `cargo xtask build-ebpf`)",
            path.display()
        )
    });
    // No pin paths: nothing outlives the test; the maps go with `ebpf`.
    let mut ebpf = EbpfLoader::new()
        .load(&object)
        .unwrap_or_else(|e| panic!("maps or BTF refused by this kernel: {e}"));
    let mut loaded = Vec::new();
    let mut refused = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        match load(program) {
            Ok(()) => loaded.push(name.to_string()),
            Err(log) => refused.push(format!("{name}:\n{log}")),
        }
    }
    eprintln!("loaded: {}", loaded.join(", "));
    assert!(
        refused.is_empty(),
        "refused by the verifier of {}:\n\n{}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        refused.join("\n\n")
    );
    assert!(!loaded.is_empty(), "the object holds no programs");
}
