//! Load sizes of the three modes. Every count and every duration here is
//! a bound: scenarios stop at whichever comes first.
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    /// Rounds of scenario 1 (sides interleaved, median kept).
    pub rounds: usize,
    /// Scenario 1: messages and concurrent sessions per side and round.
    pub messages: u32,
    pub sessions: u32,
    /// Scenario 1: upper bound of one smtp-source run.
    pub throughput_timeout: Duration,
    /// Scenario 2: held session counts, one measurement each.
    pub hold_levels: Vec<u32>,
    /// Scenario 2: how long the held sessions are watched for CPU.
    pub hold_window: Duration,
    /// Scenario 3: pre-greet sessions and the time bound.
    pub pregreet_sessions: u32,
    pub pregreet_time: Duration,
    /// Scenario 4: SYN packets per side and the time bound.
    pub syn_packets: u64,
    pub syn_time: Duration,
    /// Scenario 4's gate: frames per side through BPF_PROG_RUN with live
    /// frames (bounded by `syn_time` too).
    pub live_frames: u64,
    /// Scenario 6: sessions in the greeting delay, and the delay.
    pub lateness_sessions: u32,
    pub lateness_delay: Duration,
    /// Their arrivals per second (issue 19: 10,000 over 5 s, not all at
    /// once); 0 is as fast as the workers connect.
    pub lateness_rate: u32,
    /// Scenario 7 (kernel hold): bots held in all, of which this many
    /// talk first (their probes measure the cost per probe), and how long
    /// they are watched once all are in.
    pub kernel_hold_bots: u32,
    pub kernel_hold_talkers: u32,
    pub kernel_hold_window: Duration,
    /// Cluster (issue 20): admin blocks added at node 1 and offenders
    /// blocked there (at most 200: one source address each), their pace
    /// (per second), greylist first tries at node 1, Redis round trips
    /// timed, and local greylist decisions timed per phase.
    pub cluster_blocks: u32,
    pub cluster_offenders: u32,
    pub cluster_block_rate: u32,
    pub cluster_grey_tries: u32,
    pub cluster_redis_calls: u32,
    pub greylist_checks: u32,
    /// Client worker processes (sockets are spread over them).
    pub workers: u32,
    /// Source addresses the clients are spread over (per family).
    pub source_addrs: u32,
}

impl Profile {
    pub fn smoke() -> Profile {
        Profile {
            name: "smoke",
            rounds: 1,
            messages: 20,
            sessions: 2,
            throughput_timeout: Duration::from_secs(20),
            hold_levels: vec![50],
            hold_window: Duration::from_secs(1),
            pregreet_sessions: 40,
            pregreet_time: Duration::from_secs(5),
            syn_packets: 20_000,
            live_frames: 20_000,
            syn_time: Duration::from_secs(2),
            lateness_sessions: 20,
            lateness_delay: Duration::from_secs(1),
            lateness_rate: 0,
            kernel_hold_bots: 400,
            kernel_hold_talkers: 100,
            kernel_hold_window: Duration::from_secs(2),
            cluster_blocks: 6,
            cluster_offenders: 4,
            cluster_block_rate: 20,
            cluster_grey_tries: 3,
            cluster_redis_calls: 200,
            greylist_checks: 1_000,
            workers: 2,
            source_addrs: 4,
        }
    }

    pub fn quick() -> Profile {
        Profile {
            name: "quick",
            rounds: 1,
            messages: 1000,
            sessions: 20,
            throughput_timeout: Duration::from_secs(40),
            hold_levels: vec![5000],
            hold_window: Duration::from_secs(3),
            pregreet_sessions: 4000,
            pregreet_time: Duration::from_secs(8),
            syn_packets: 1_000_000,
            live_frames: 2_000_000,
            syn_time: Duration::from_secs(5),
            lateness_sessions: 2000,
            lateness_delay: Duration::from_secs(3),
            lateness_rate: 1000,
            kernel_hold_bots: 20_000,
            kernel_hold_talkers: 4000,
            kernel_hold_window: Duration::from_secs(20),
            cluster_blocks: 200,
            cluster_offenders: 100,
            cluster_block_rate: 50,
            cluster_grey_tries: 50,
            cluster_redis_calls: 5_000,
            greylist_checks: 20_000,
            workers: 2,
            source_addrs: 64,
        }
    }

    pub fn full() -> Profile {
        Profile {
            name: "full",
            rounds: 3,
            messages: 2000,
            sessions: 20,
            throughput_timeout: Duration::from_secs(60),
            // 19,000: near one process's 20,000 descriptors here.
            hold_levels: vec![1000, 5000, 15000, 19000],
            hold_window: Duration::from_secs(5),
            pregreet_sessions: 20_000,
            pregreet_time: Duration::from_secs(20),
            syn_packets: 4_000_000,
            live_frames: 8_000_000,
            syn_time: Duration::from_secs(10),
            lateness_sessions: 10_000,
            lateness_delay: Duration::from_secs(5),
            lateness_rate: 2000,
            kernel_hold_bots: 100_000,
            kernel_hold_talkers: 20_000,
            kernel_hold_window: Duration::from_secs(120),
            cluster_blocks: 1000,
            cluster_offenders: 200,
            cluster_block_rate: 50,
            cluster_grey_tries: 200,
            cluster_redis_calls: 10_000,
            greylist_checks: 100_000,
            workers: 4,
            source_addrs: 200,
        }
    }
}
