//! Tests of the greylist table ([`super`]).
use super::*;

const MIN: u64 = 300;
const WINDOW: u64 = 4 * 3600;
const PASS: u64 = 36 * 86400;
const T0: u64 = 1_700_000_000;

fn limits(max_pending: usize, max_known: usize, per_network: usize) -> Limits {
    Limits {
        windows: Windows {
            min_wait: MIN,
            retry_window: WINDOW,
            pass_ttl: PASS,
        },
        max_pending,
        max_known,
        per_network,
    }
}

fn id(n: u32) -> Id {
    let mut i = [0u8; 16];
    i[..4].copy_from_slice(&n.to_be_bytes());
    i
}

fn tempfail(o: &GreyCheck) -> bool {
    matches!(o.verdict, GreyVerdict::TempFail { .. })
}

#[test]
fn first_attempt_early_retry_then_known() {
    let mut t = GreyTable::new(limits(100, 100, 10));
    let o = t.check(&id(1), 7, T0);
    assert_eq!(o.verdict, GreyVerdict::TempFail { retry_in: MIN });
    assert_eq!(
        o.write,
        Some(Record::Pending {
            id: id(1),
            p: Pending { first: T0, net: 7 }
        })
    );
    let o = t.check(&id(1), 7, T0 + MIN - 1);
    assert_eq!(o.verdict, GreyVerdict::TempFail { retry_in: 1 });
    assert_eq!(o.write, None);
    let o = t.check(&id(1), 7, T0 + MIN);
    assert_eq!(o.verdict, GreyVerdict::Pass);
    assert_eq!(
        o.write,
        Some(Record::Known {
            id: id(1),
            until: T0 + MIN + PASS
        })
    );
    assert_eq!((t.pending_len(), t.known_len()), (0, 1));
    assert_eq!(
        t.check(&id(1), 7, T0 + MIN + PASS).verdict,
        GreyVerdict::Pass
    );
}

#[test]
fn retry_after_the_window_starts_over_and_known_expires() {
    let mut t = GreyTable::new(limits(100, 100, 10));
    t.check(&id(1), 7, T0);
    let o = t.check(&id(1), 7, T0 + WINDOW + 1);
    assert!(tempfail(&o));
    assert_eq!(
        o.write,
        Some(Record::Pending {
            id: id(1),
            p: Pending {
                first: T0 + WINDOW + 1,
                net: 7
            }
        })
    );
    let t1 = T0 + WINDOW + 1 + MIN;
    assert_eq!(t.check(&id(1), 7, t1).verdict, GreyVerdict::Pass);
    // Renewed within the hour: not written again.
    assert_eq!(t.check(&id(1), 7, t1 + 60).write, None);
    assert!(tempfail(&t.check(&id(1), 7, t1 + 60 + PASS + 1)));
}

#[test]
fn a_network_at_its_cap_is_refused_unrecorded_others_are_not() {
    let mut t = GreyTable::new(limits(1000, 1000, 3));
    for n in 0..3 {
        let o = t.check(&id(n), 1, T0);
        assert!(tempfail(&o) && !o.capped && o.write.is_some());
    }
    for n in 3..100 {
        let o = t.check(&id(n), 1, T0 + 1);
        assert!(tempfail(&o), "the same 451");
        assert!(o.capped);
        assert_eq!(o.write, None, "not recorded");
    }
    assert_eq!(t.pending_len(), 3);
    // Another network is not affected.
    let o = t.check(&id(500), 2, T0 + 1);
    assert!(!o.capped && o.write.is_some());
    // A capped attempt was never recorded: its retry is refused again.
    let o = t.check(&id(3), 1, T0 + MIN + 1);
    assert!(tempfail(&o) && o.capped);
    // The recorded ones pass on retry, which frees the network's slots.
    assert_eq!(t.check(&id(0), 1, T0 + MIN + 1).verdict, GreyVerdict::Pass);
    let o = t.check(&id(4), 1, T0 + MIN + 2);
    assert!(!o.capped && o.write.is_some());
    // After the window the network's expired attempts free their slots.
    let late = T0 + WINDOW + MIN + 3;
    for n in 10..13 {
        assert!(!t.check(&id(n), 1, late).capped);
    }
    assert!(t.check(&id(13), 1, late).capped);
}

#[test]
fn full_pending_evicts_the_oldest_and_never_passes() {
    let mut t = GreyTable::new(limits(10, 100, 10));
    // Ten networks, one attempt each, a second apart.
    for n in 0..10u32 {
        t.check(&id(n), u64::from(n), T0 + u64::from(n));
    }
    assert_eq!(t.pending_len(), 10);
    let o = t.check(&id(100), 100, T0 + 20);
    assert!(tempfail(&o), "full is never a pass");
    assert_eq!(o.evicted, (1, 0));
    assert_eq!(t.pending_len(), 10);
    // The oldest (id 0) went; its retry counts as a first attempt. The
    // next oldest still passes on retry.
    assert_eq!(t.check(&id(1), 1, T0 + MIN + 1).verdict, GreyVerdict::Pass);
    let o = t.check(&id(0), 0, T0 + MIN + 1);
    assert!(tempfail(&o));
    assert!(matches!(o.write, Some(Record::Pending { .. })));
    // A flood of new keys never lets any of them pass.
    for n in 1000..3000u32 {
        let o = t.check(&id(n), u64::from(n), T0 + MIN + 2);
        assert!(tempfail(&o));
        assert!(t.pending_len() <= 10);
    }
}

#[test]
fn full_known_evicts_the_least_recently_renewed() {
    let mut t = GreyTable::new(limits(100, 3, 100));
    for n in 0..3u32 {
        t.check(&id(n), 1, T0 + u64::from(n));
    }
    for n in 0..3u32 {
        assert_eq!(
            t.check(&id(n), 1, T0 + MIN + u64::from(n)).verdict,
            GreyVerdict::Pass
        );
    }
    // id 0 is renewed much later: id 1 is now the stalest.
    t.check(&id(0), 1, T0 + 86400);
    t.check(&id(9), 1, T0 + 86400);
    let o = t.check(&id(9), 1, T0 + 86400 + MIN);
    assert_eq!(o.verdict, GreyVerdict::Pass);
    assert_eq!(o.evicted, (0, 1));
    assert_eq!(t.known_len(), 3);
    assert_eq!(
        t.check(&id(0), 1, T0 + 86400 + MIN).verdict,
        GreyVerdict::Pass
    );
    assert_eq!(
        t.check(&id(2), 1, T0 + 86400 + MIN).verdict,
        GreyVerdict::Pass
    );
    assert!(tempfail(&t.check(&id(1), 1, T0 + 86400 + MIN)));
}

#[test]
fn restore_keeps_the_later_record_and_bounds() {
    let mut t = GreyTable::new(limits(2, 2, 2));
    let p = |first| Pending { first, net: 5 };
    t.restore(Record::Pending {
        id: id(1),
        p: p(T0),
    });
    t.restore(Record::Known {
        id: id(1),
        until: T0 + PASS,
    });
    t.restore(Record::Pending {
        id: id(2),
        p: p(T0),
    });
    t.restore(Record::Pending {
        id: id(3),
        p: p(T0 + 1),
    });
    t.restore(Record::Pending {
        id: id(4),
        p: p(T0 + 2),
    });
    assert_eq!(t.enforce_bounds(), (1, 0));
    assert_eq!((t.pending_len(), t.known_len()), (2, 1));
    assert_eq!(t.per_net.get(&5), Some(&2));
    assert_eq!(t.check(&id(1), 5, T0 + 10).verdict, GreyVerdict::Pass);
    assert_eq!(t.check(&id(4), 5, T0 + MIN + 2).verdict, GreyVerdict::Pass);
    assert!(tempfail(&t.check(&id(2), 5, T0 + MIN + 2)), "evicted");
}

/// The sizes docs/reputation.md states ("Memory and file size").
#[test]
fn entry_sizes_are_as_documented() {
    assert_eq!(std::mem::size_of::<(Id, Pending)>(), 32);
    assert_eq!(std::mem::size_of::<(Id, u64)>(), 24);
    assert_eq!(std::mem::size_of::<(NetId, u32)>(), 16);
    // A full table holds at most 2 * 8/7 buckets per entry (growth by
    // doubling, 7/8 load), each entry + 1 control byte: <= 76 bytes
    // per pending entry, <= 39 for its network's count, <= 58 per
    // known entry. Checked on real tables:
    let n = 20_000;
    let mut t = GreyTable::new(limits(n, n, 1));
    for i in 0..n as u32 {
        // Every pending entry from its own network: the worst case.
        t.check(&id(i), u64::from(i), T0);
    }
    for i in 0..n as u32 {
        t.check(&id(i), u64::from(i), T0 + MIN);
        t.check(&id(n as u32 + i), u64::from(i), T0 + MIN);
    }
    assert_eq!((t.pending_len(), t.known_len()), (n, n));
    assert!(
        t.heap_bytes() <= n * (PENDING_BYTES + KNOWN_BYTES),
        "{} bytes for {n} + {n} entries",
        t.heap_bytes()
    );
}

/// Stated in docs/reputation.md.
const PENDING_BYTES: usize = 115;
const KNOWN_BYTES: usize = 58;

#[test]
fn a_first_attempt_at_another_host_lets_the_retry_here_pass_after_the_wait() {
    let mut here = GreyTable::new(limits(100, 100, 10));
    let p = Pending { first: T0, net: 7 };
    assert!(here.merge(Record::Pending { id: id(1), p }, T0 + 1));
    // Too early, counted from the first try elsewhere.
    assert_eq!(
        here.check(&id(1), 7, T0 + MIN - 10).verdict,
        GreyVerdict::TempFail { retry_in: 10 }
    );
    assert_eq!(here.check(&id(1), 7, T0 + MIN).verdict, GreyVerdict::Pass);
}

#[test]
fn merge_keeps_the_earliest_first_attempt_and_a_pass_beats_a_first_attempt() {
    let mut t = GreyTable::new(limits(100, 100, 10));
    t.check(&id(1), 7, T0 + 100);
    // An earlier first try elsewhere moves the start back...
    assert!(t.merge(
        Record::Pending {
            id: id(1),
            p: Pending { first: T0, net: 7 }
        },
        T0 + 100
    ));
    // ...a later one does not move it forward.
    assert!(!t.merge(
        Record::Pending {
            id: id(1),
            p: Pending {
                first: T0 + 50,
                net: 7
            }
        },
        T0 + 100
    ));
    assert_eq!(t.check(&id(1), 7, T0 + MIN).verdict, GreyVerdict::Pass);
    // Known now: a first attempt from elsewhere does not undo the pass.
    assert!(!t.merge(
        Record::Pending {
            id: id(1),
            p: Pending {
                first: T0 + MIN,
                net: 7
            }
        },
        T0 + MIN + 1
    ));
    assert_eq!(t.check(&id(1), 7, T0 + MIN + 2).verdict, GreyVerdict::Pass);
    // A pass elsewhere: known here at once, later expiry wins, expired ignored.
    assert!(t.merge(
        Record::Known {
            id: id(2),
            until: T0 + PASS
        },
        T0
    ));
    assert!(!t.merge(
        Record::Known {
            id: id(2),
            until: T0 + 10
        },
        T0
    ));
    assert!(!t.merge(
        Record::Known {
            id: id(3),
            until: T0 - 1
        },
        T0
    ));
    assert_eq!(t.check(&id(2), 9, T0 + 1).verdict, GreyVerdict::Pass);
    // An expired first attempt changes nothing.
    assert!(!t.merge(
        Record::Pending {
            id: id(4),
            p: Pending {
                first: T0 - WINDOW - 1,
                net: 9
            }
        },
        T0
    ));
}
