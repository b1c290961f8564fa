//! CPU time and resident memory from /proc: what each side costs.
//!
//! CPU of a group of processes is the sum of `utime + stime + cutime +
//! cstime` over the group: a short-lived child (a Postfix smtpd) that exits
//! between two snapshots is still counted once its parent (master) reaps
//! it, and a child alive at both snapshots is not counted twice.
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Fields after the command name of /proc/PID/stat (0 = state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// CPU seconds of one process: its own and its reaped children's.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    // utime stime cutime cstime are fields 14..17 of stat, 11..14 here.
    let sum: u64 = (11..=14)
        .map(|i| {
            f.get(i)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
                .max(0) as u64
        })
        .sum();
    Some(sum as f64 / ticks_per_second())
}

/// Resident set size in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The command name (`comm`) of a process.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Every process living in a network namespace.
pub fn ns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// CPU seconds of a group of processes at one instant.
#[derive(Debug, Clone, Default)]
pub struct GroupCpu(HashMap<u32, f64>);

impl GroupCpu {
    pub fn of(pids: &[u32]) -> GroupCpu {
        GroupCpu(
            pids.iter()
                .filter_map(|&p| Some((p, cpu_seconds(p)?)))
                .collect(),
        )
    }

    /// Every process in a namespace.
    pub fn of_ns(ns: &str) -> GroupCpu {
        GroupCpu::of(&ns_pids(ns))
    }

    pub fn total(&self) -> f64 {
        self.0.values().sum()
    }

    /// CPU spent between `self` and `later`.
    pub fn since(&self, later: &GroupCpu) -> f64 {
        (later.total() - self.total()).max(0.0)
    }
}

/// The machine-wide `cpu` line of /proc/stat, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    pub busy: f64,
    pub softirq: f64,
}

impl MachineCpu {
    pub fn now() -> MachineCpu {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
            return MachineCpu::default();
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let hz = ticks_per_second();
        let get = |i: usize| v.get(i).copied().unwrap_or(0) as f64 / hz;
        // user nice system idle iowait irq softirq steal
        MachineCpu {
            busy: get(0) + get(1) + get(2) + get(5) + get(6) + get(7),
            softirq: get(6),
        }
    }

    pub fn since(&self, later: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: (later.busy - self.busy).max(0.0),
            softirq: (later.softirq - self.softirq).max(0.0),
        }
    }
}

/// CPU time (user + system, seconds) of the children this process has
/// waited for: a client tool's own cost once it has exited and been reaped.
pub fn children_cpu() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid pointer to that struct.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// CPU time of the calling thread (precise, not tick-sampled).
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// On-CPU time of a task in seconds, precise (scheduler runtime from
/// /proc/PID/schedstat, not tick-sampled).
pub fn runtime_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// Pids of the per-CPU softirq threads, which run the receive path when
/// it is not done inline after a send.
pub fn ksoftirqd_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&p| comm(p).is_some_and(|c| c.starts_with("ksoftirqd/")))
                .collect()
        })
        .unwrap_or_default()
}

/// Summed precise runtime of a set of tasks.
pub fn runtime_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| runtime_seconds(p)).sum()
}

/// The kernel's slab memory (`Slab:` of /proc/meminfo), in bytes: what
/// sockets, their files and epoll entries cost the kernel, machine-wide.
pub fn kernel_slab_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}
