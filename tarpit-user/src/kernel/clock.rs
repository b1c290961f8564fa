//! The kernel programs keep time on the boot clock (`bpf_ktime_get_boot_ns`
//! = `CLOCK_BOOTTIME`): monotonic, counting through suspend, independent of
//! the wall clock. Expiry times in the maps use it; these helpers convert
//! to and from wall time for people.
use std::time::{Duration, SystemTime};

/// A point on the kernel's boot clock, in nanoseconds since boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BootInstant(pub u64);

impl BootInstant {
    /// Now, as the kernel programs see it.
    pub fn now() -> BootInstant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        BootInstant(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// `d` from now; saturates instead of overflowing.
    pub fn after(d: Duration) -> BootInstant {
        BootInstant::now().plus(d)
    }

    pub fn plus(self, d: Duration) -> BootInstant {
        BootInstant(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// The wall time of this instant, given "now" on both clocks.
    pub fn to_system_time_at(self, boot_now: BootInstant, wall_now: SystemTime) -> SystemTime {
        if self.0 >= boot_now.0 {
            wall_now + Duration::from_nanos(self.0 - boot_now.0)
        } else {
            wall_now - Duration::from_nanos(boot_now.0 - self.0)
        }
    }

    /// The wall time of this instant (for display).
    pub fn to_system_time(self) -> SystemTime {
        self.to_system_time_at(BootInstant::now(), SystemTime::now())
    }

    /// The boot-clock instant of a wall time, given "now" on both clocks.
    pub fn from_system_time_at(
        t: SystemTime,
        boot_now: BootInstant,
        wall_now: SystemTime,
    ) -> BootInstant {
        match t.duration_since(wall_now) {
            Ok(ahead) => boot_now.plus(ahead),
            Err(e) => BootInstant(
                boot_now
                    .0
                    .saturating_sub(u64::try_from(e.duration().as_nanos()).unwrap_or(u64::MAX)),
            ),
        }
    }

    /// The boot-clock instant of a wall time.
    pub fn from_system_time(t: SystemTime) -> BootInstant {
        Self::from_system_time_at(t, BootInstant::now(), SystemTime::now())
    }

    /// Time left until this instant (zero when past).
    pub fn remaining(self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(BootInstant::now().0))
    }
}

/// An expiry as stored in the maps: 0 = never.
pub fn expiry_from_ttl(ttl: Option<Duration>) -> u64 {
    match ttl {
        None => 0,
        Some(d) => BootInstant::after(d).0.max(1),
    }
}

/// The stored expiry as an instant (`None` = never).
pub fn expiry_to_instant(ns: u64) -> Option<BootInstant> {
    (ns != 0).then_some(BootInstant(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_conversion_round_trips() {
        let boot = BootInstant(1_000_000_000_000);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let later = BootInstant(boot.0 + 5_000_000_000);
        let t = later.to_system_time_at(boot, wall);
        assert_eq!(t, wall + Duration::from_secs(5));
        assert_eq!(BootInstant::from_system_time_at(t, boot, wall), later);
        let earlier = BootInstant(boot.0 - 7_000_000_000);
        let t = earlier.to_system_time_at(boot, wall);
        assert_eq!(t, wall - Duration::from_secs(7));
        assert_eq!(BootInstant::from_system_time_at(t, boot, wall), earlier);
    }

    #[test]
    fn ttl_none_never_expires_and_some_is_in_the_future() {
        assert_eq!(expiry_from_ttl(None), 0);
        let before = BootInstant::now();
        let e = expiry_from_ttl(Some(Duration::from_secs(60)));
        assert!(e >= before.0 + 60_000_000_000);
        assert_eq!(expiry_to_instant(0), None);
        assert!(BootInstant(e).remaining() > Duration::from_secs(59));
    }

    #[test]
    fn huge_ttl_saturates() {
        assert_eq!(BootInstant(5).plus(Duration::MAX), BootInstant(u64::MAX));
    }
}
