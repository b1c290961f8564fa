//! The identity and capability lines of `/proc/PID/status`, and
//! capability sets as the kernel's 64-bit masks: how the drop checks
//! itself, and how tests see any thread of any process (the `caps` crate
//! reads only the calling thread's sets).
use anyhow::{Context, Result};

/// A set of capabilities as the kernel's 64-bit mask (`CapEff:` etc. in
/// `/proc/PID/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn of(caps: &[u32]) -> CapSet {
        CapSet(caps.iter().fold(0, |m, c| m | (1u64 << c)))
    }

    pub fn contains(self, cap: u32) -> bool {
        self.0 & (1u64 << cap) != 0
    }

    pub fn is_subset_of(self, other: CapSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Names, for logs and errors ("CAP_BPF,CAP_NET_ADMIN"; "none").
    pub fn names(self) -> String {
        if self.0 == 0 {
            return "none".into();
        }
        (0..64)
            .filter(|c| self.contains(*c))
            .map(|c| {
                caps::all()
                    .into_iter()
                    .find(|k| u32::from(k.index()) == c)
                    .map_or_else(|| format!("cap_{c}"), |k| k.to_string())
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `caps` crate's view of this set (capabilities it knows).
    pub fn to_caps(self) -> caps::CapsHashSet {
        caps::all()
            .into_iter()
            .filter(|k| self.contains(u32::from(k.index())))
            .collect()
    }
}

/// The identity and capability lines of `/proc/PID/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStatus {
    /// Real, effective, saved, filesystem.
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inh: CapSet,
    pub cap_prm: CapSet,
    pub cap_eff: CapSet,
    pub cap_bnd: CapSet,
    pub cap_amb: CapSet,
    pub no_new_privs: bool,
}

impl ProcStatus {
    pub fn read(pid: u32) -> Result<ProcStatus> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        ProcStatus::parse(&text)
    }

    pub fn parse(text: &str) -> Result<ProcStatus> {
        let field = |name: &str| -> Result<&str> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .with_context(|| format!("no {name} line in /proc status"))
        };
        let ids = |name: &str| -> Result<[u32; 4]> {
            let v: Vec<u32> = field(name)?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("bad {name} line"))?;
            v.try_into()
                .map_err(|_| anyhow::anyhow!("{name} line has not 4 ids"))
        };
        let caps = |name: &str| -> Result<CapSet> {
            let hex = field(name)?;
            u64::from_str_radix(hex, 16)
                .map(CapSet)
                .with_context(|| format!("bad {name} line {hex:?}"))
        };
        Ok(ProcStatus {
            uid: ids("Uid")?,
            gid: ids("Gid")?,
            groups: field("Groups")?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .context("bad Groups line")?,
            cap_inh: caps("CapInh")?,
            cap_prm: caps("CapPrm")?,
            cap_eff: caps("CapEff")?,
            cap_bnd: caps("CapBnd")?,
            cap_amb: caps("CapAmb").unwrap_or_default(),
            no_new_privs: field("NoNewPrivs").map(|v| v == "1").unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::CAP_BPF;
    use super::*;
    use nix::unistd::Uid;

    #[test]
    fn parses_proc_status() {
        let text = "Name:\ttarpit\nUid:\t65534\t65534\t65534\t65534\n\
                    Gid:\t65534\t65534\t65534\t65534\nGroups:\t65534 \n\
                    CapInh:\t0000000000000000\nCapPrm:\t0000008000000000\n\
                    CapEff:\t0000008000000000\nCapBnd:\t0000008000000000\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        let st = ProcStatus::parse(text).unwrap();
        assert_eq!(st.uid, [65534; 4]);
        assert_eq!(st.groups, vec![65534]);
        assert_eq!(st.cap_eff, CapSet::of(&[CAP_BPF]));
        assert!(st.no_new_privs);
        // our own status parses too
        let me = ProcStatus::read(std::process::id()).unwrap();
        assert_eq!(me.uid[0], Uid::current().as_raw());
    }

    #[test]
    fn caps_crate_sees_what_proc_shows() {
        let st = ProcStatus::read(std::process::id()).unwrap();
        // the test thread is not the main thread, but threads are born
        // with their parent's sets and tests change none of them
        let mask = |set| {
            caps::read(None, set)
                .unwrap()
                .iter()
                .fold(0u64, |m, c| m | c.bitmask())
        };
        assert_eq!(CapSet(mask(caps::CapSet::Permitted)), st.cap_prm);
        assert_eq!(CapSet(mask(caps::CapSet::Effective)), st.cap_eff);
        assert_eq!(CapSet::of(&[CAP_BPF]).to_caps().len(), 1);
    }
}
