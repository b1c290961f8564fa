//! One test (at least) per row of the policy table in DESIGN.md.
use super::*;

fn policy(toml: &str) -> Policy {
    Policy::new(&Config::parse(toml).expect("test config"))
}

fn state(p: &Policy, ip: &str) -> SessionState {
    SessionState::new(p.classify(ip.parse().unwrap(), 25))
}

const BOT: &str = "198.51.100.9";

fn secs(d: Option<Delay>) -> f64 {
    d.map_or(0.0, |d| d.duration.as_secs_f64())
}

/// Runs one command through observe + command_delay + settle.
fn reply_hold(p: &Policy, s: &mut SessionState, step: Step<'_>, code: u16) -> Option<Delay> {
    p.observe(s, step);
    let c = p.command_delay(s, step, None, Instant::now());
    p.settle(s, c, code)
}

#[test]
fn greeting_delay_and_pre_greet_by_default() {
    let p = policy("");
    let mut s = state(&p, BOT);
    let g = p.greeting(&mut s);
    assert_eq!(
        g.delay,
        Some(Delay {
            duration: Duration::from_secs(5),
            reason: Reason::Greeting
        })
    );
    assert!(g.check_pre_greet);
    assert_eq!(g.teaser, None);
    assert_eq!(s.delay_spent, Duration::from_secs(5));
}

#[test]
fn implicit_tls_port_is_never_checked_for_pre_greet() {
    let p = policy("[greeting]\nteaser = \"mx ESMTP\"\n");
    let mut s = SessionState::new(p.classify(BOT.parse().unwrap(), 465));
    let g = p.greeting(&mut s);
    assert!(!g.check_pre_greet);
    assert_eq!(g.teaser, None);
    let mut s = state(&p, BOT);
    assert_eq!(p.greeting(&mut s).teaser.as_deref(), Some("mx ESMTP"));
}

#[test]
fn pre_greet_drop_can_be_turned_off() {
    let p = policy("[greeting]\ndrop_pre_greet = false\n");
    assert!(!p.greeting(&mut state(&p, BOT)).check_pre_greet);
}

#[test]
fn master_switch_off_is_a_transparent_proxy() {
    let p = policy(
        "enabled = false\n[helo]\ndelay = \"3s\"\n[reject]\ndelay = \"30s\"\n[blacklist]\nips = [\"198.51.100.0/24\"]\n",
    );
    let mut s = state(&p, BOT);
    let g = p.greeting(&mut s);
    assert_eq!(g.delay, None);
    assert!(!g.check_pre_greet);
    assert_eq!(reply_hold(&p, &mut s, Step::Helo("x"), 250), None);
    assert_eq!(reply_hold(&p, &mut s, Step::Mail("a@b"), 550), None);
    for _ in 0..10 {
        assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 250), None);
    }
}

#[test]
fn helo_delay() {
    let p = policy("[helo]\ndelay = \"7s\"\n");
    let mut s = state(&p, BOT);
    assert_eq!(secs(reply_hold(&p, &mut s, Step::Helo("client"), 250)), 7.0);
    // the EHLO after STARTTLS does not pay again
    assert_eq!(reply_hold(&p, &mut s, Step::Helo("client"), 250), None);
    // default: off
    let p = policy("");
    assert_eq!(
        reply_hold(&p, &mut state(&p, BOT), Step::Helo("c"), 250),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn authenticated_ips_pay_the_helo_delay_once_per_day() {
    let p = policy("[helo]\ndelay = \"5s\"\nauthenticated_once_per_day = true\n");
    let store = MemoryAuthStore::new(100);
    let ip: IpAddr = BOT.parse().unwrap();
    // first session: pays, then authenticates
    let mut s = state(&p, BOT);
    let last = store.last_authenticated(ip, Instant::now());
    assert_eq!(
        secs(p.command_delay(&mut s, Step::Helo("c"), last, Instant::now())),
        5.0
    );
    store.record(ip, Instant::now());
    // 23 h later: no HELO delay
    tokio::time::advance(Duration::from_secs(23 * 3600)).await;
    let mut s = state(&p, BOT);
    let last = store.last_authenticated(ip, Instant::now());
    assert_eq!(
        p.command_delay(&mut s, Step::Helo("c"), last, Instant::now()),
        None
    );
    // another address still pays
    let mut other = state(&p, "198.51.100.10");
    let last = store.last_authenticated("198.51.100.10".parse().unwrap(), Instant::now());
    assert_eq!(
        secs(p.command_delay(&mut other, Step::Helo("c"), last, Instant::now())),
        5.0
    );
    // a day after the AUTH: pays again
    tokio::time::advance(Duration::from_secs(3600)).await;
    let mut s = state(&p, BOT);
    let last = store.last_authenticated(ip, Instant::now());
    assert_eq!(
        secs(p.command_delay(&mut s, Step::Helo("c"), last, Instant::now())),
        5.0
    );
}

#[tokio::test(start_paused = true)]
async fn once_per_day_off_means_every_session_pays() {
    let p = policy("[helo]\ndelay = \"5s\"\n");
    let t = Instant::now();
    tokio::time::advance(Duration::from_secs(60)).await;
    let mut s = state(&p, BOT);
    assert_eq!(
        secs(p.command_delay(&mut s, Step::Helo("c"), Some(t), Instant::now())),
        5.0
    );
}

#[test]
fn rcpt_threshold_then_flat_delay_by_default() {
    let p = policy("");
    let mut s = state(&p, BOT);
    let holds: Vec<f64> = (0..8)
        .map(|_| secs(reply_hold(&p, &mut s, Step::Rcpt, 250)))
        .collect();
    assert_eq!(holds, vec![0.0, 0.0, 0.0, 0.0, 0.0, 10.0, 10.0, 10.0]);
}

#[test]
fn rcpt_scaling_securitygateway_example() {
    let p = policy("[rcpt]\nthreshold = 2\ndelay = \"10s\"\nscaling = 1.5\n");
    let mut s = state(&p, BOT);
    let holds: Vec<f64> = (0..6)
        .map(|_| secs(reply_hold(&p, &mut s, Step::Rcpt, 250)))
        .collect();
    assert_eq!(holds, vec![0.0, 0.0, 10.0, 15.0, 20.0, 25.0]);
}

#[test]
fn rcpt_growth_is_capped_at_600s() {
    let p = policy("[rcpt]\nthreshold = 0\ndelay = \"500s\"\nscaling = 2.0\n");
    assert_eq!(secs(p.rcpt_delay(1)), 500.0);
    assert_eq!(secs(p.rcpt_delay(2)), 600.0);
    assert_eq!(secs(p.rcpt_delay(1000)), 600.0);
}

#[test]
fn reject_delay_holds_5xx_only() {
    let p = policy("[reject]\ndelay = \"30s\"\n");
    let mut s = state(&p, BOT);
    assert_eq!(secs(reply_hold(&p, &mut s, Step::Rcpt, 550)), 30.0);
    assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 450), None);
    assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 250), None);
    // an agent-made 5xx (no command delay) is held too
    assert_eq!(
        p.settle(&mut s, None, 500).map(|d| d.reason),
        Some(Reason::Reject)
    );
    // off by default
    let p = policy("");
    assert_eq!(reply_hold(&p, &mut state(&p, BOT), Step::Rcpt, 550), None);
}

#[test]
fn delays_overlap_rather_than_add_up() {
    let p = policy("[rcpt]\nthreshold = 0\ndelay = \"10s\"\n[reject]\ndelay = \"30s\"\n");
    let mut s = state(&p, BOT);
    let d = reply_hold(&p, &mut s, Step::Rcpt, 550).unwrap();
    assert_eq!((d.duration.as_secs(), d.reason), (30, Reason::Reject));
    let d = reply_hold(&p, &mut s, Step::Rcpt, 250).unwrap();
    assert_eq!((d.duration.as_secs(), d.reason), (10, Reason::Rcpt));
}

#[test]
fn blacklisted_ip_is_delayed_from_mail_from_on() {
    let p = policy("[blacklist]\nips = [\"198.51.100.0/28\", \"fd5b:1e00::/120\"]\n");
    for ip in [BOT, "fd5b:1e00::9", "::ffff:198.51.100.9"] {
        let mut s = state(&p, ip);
        assert!(s.client.blacklisted, "{ip}");
        assert_eq!(reply_hold(&p, &mut s, Step::Helo("c"), 250), None);
        assert_eq!(reply_hold(&p, &mut s, Step::Other, 250), None);
        for step in [
            Step::Mail("a@b.example"),
            Step::Rcpt,
            Step::Data,
            Step::DataEnd,
        ] {
            let d = reply_hold(&p, &mut s, step, 250).unwrap();
            assert_eq!(
                (d.duration.as_secs(), d.reason),
                (60, Reason::Blacklist),
                "{step:?}"
            );
        }
    }
    let mut clean = state(&p, "198.51.100.200");
    assert_eq!(
        reply_hold(&p, &mut clean, Step::Mail("a@b.example"), 250),
        None
    );
}

#[test]
fn blacklisted_sender_and_helo_patterns() {
    let p = policy(
        "[blacklist]\ndelay = \"20s\"\nsenders = [\"*@spam.example\"]\nhelos = [\"*.dyn.example\"]\n",
    );
    let mut s = state(&p, BOT);
    assert_eq!(
        secs(reply_hold(&p, &mut s, Step::Mail("x@SPAM.example"), 250)),
        20.0
    );
    assert_eq!(secs(reply_hold(&p, &mut s, Step::Rcpt, 250)), 20.0);
    // a new transaction with a clean sender is not delayed
    p.observe(&mut s, Step::Rset);
    assert_eq!(
        reply_hold(&p, &mut s, Step::Mail("x@ham.example"), 250),
        None
    );
    let mut s = state(&p, BOT);
    assert_eq!(
        reply_hold(&p, &mut s, Step::Helo("1-2.dyn.example"), 250),
        None
    );
    assert_eq!(
        secs(reply_hold(&p, &mut s, Step::Mail("x@ham.example"), 250)),
        20.0
    );
}

#[test]
fn callout_senders_skip_only_the_mail_and_first_two_rcpt_holds() {
    let p = policy("[blacklist]\nips = [\"198.51.100.0/24\"]\n");
    for sender in ["", "double-bounce@mx.example.org"] {
        let mut s = state(&p, BOT);
        assert_eq!(
            reply_hold(&p, &mut s, Step::Mail(sender), 250),
            None,
            "{sender:?}"
        );
        // a Postfix verify probe sends one RCPT, Exim's callout/random two
        assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 250), None, "{sender:?}");
        assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 250), None, "{sender:?}");
        // more is no longer a callout: held, and so are DATA and its end
        assert_eq!(secs(reply_hold(&p, &mut s, Step::Rcpt, 250)), 60.0);
        assert_eq!(secs(reply_hold(&p, &mut s, Step::Data, 354)), 60.0);
        assert_eq!(secs(reply_hold(&p, &mut s, Step::DataEnd, 250)), 60.0);
        // a new callout transaction starts its count again
        assert_eq!(reply_hold(&p, &mut s, Step::Mail(sender), 250), None);
        assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 250), None);
        // the next transaction with a real sender is delayed again
        assert_eq!(secs(reply_hold(&p, &mut s, Step::Mail("a@b"), 250)), 60.0);
    }
}

#[test]
fn internal_networks_are_never_blacklisted_or_delayed() {
    let p = policy(
        "[blacklist]\nips = [\"10.0.0.0/8\"]\n[allow]\ninternal = [\"10.1.0.0/16\"]\n[greeting]\ndelay = \"5s\"\n[reject]\ndelay = \"30s\"\n",
    );
    let mut s = state(&p, "10.1.2.3");
    assert!(s.client.internal && s.client.blacklisted);
    assert_eq!(p.greeting(&mut s).delay, None);
    assert_eq!(reply_hold(&p, &mut s, Step::Mail("a@b"), 550), None);
    let mut s = state(&p, "10.2.2.3");
    assert_eq!(secs(reply_hold(&p, &mut s, Step::Mail("a@b"), 250)), 60.0);
    // loopback is internal by default
    let p = policy("");
    assert!(state(&p, "127.0.0.1").client.internal);
    assert!(state(&p, "::1").client.internal);
}

#[test]
fn allowlisted_clients_are_excluded_when_configured() {
    let toml = "[allow]\nips = [\"198.51.100.9/32\"]\n[rcpt]\nthreshold = 0\n";
    let p = policy(toml);
    let mut s = state(&p, BOT);
    assert_eq!(p.greeting(&mut s).delay, None);
    assert!(!p.greeting(&mut s).check_pre_greet);
    assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 250), None);
    let p = policy(&format!("{toml}[exclude]\nallowlisted = false\n"));
    let mut s = state(&p, BOT);
    assert_eq!(secs(p.greeting(&mut s).delay), 5.0);
    assert_eq!(secs(reply_hold(&p, &mut s, Step::Rcpt, 250)), 10.0);
}

#[test]
fn authenticated_sessions_are_excluded_after_auth() {
    let p = policy("[rcpt]\nthreshold = 0\n[reject]\ndelay = \"9s\"\n");
    let mut s = state(&p, BOT);
    assert_eq!(secs(reply_hold(&p, &mut s, Step::Rcpt, 250)), 10.0);
    s.authenticated = true;
    assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 250), None);
    assert_eq!(reply_hold(&p, &mut s, Step::Rcpt, 550), None);
    let p = policy("[rcpt]\nthreshold = 0\n[exclude]\nauthenticated = false\n");
    let mut s = state(&p, BOT);
    s.authenticated = true;
    assert_eq!(secs(reply_hold(&p, &mut s, Step::Rcpt, 250)), 10.0);
}

#[test]
fn total_delay_is_capped_per_session() {
    let p =
        policy("[rcpt]\nthreshold = 0\ndelay = \"100s\"\n[limits]\nmax_total_delay = \"250s\"\n");
    let mut s = state(&p, BOT);
    assert_eq!(secs(p.greeting(&mut s).delay), 5.0);
    let holds: Vec<f64> = (0..4)
        .map(|_| secs(reply_hold(&p, &mut s, Step::Rcpt, 250)))
        .collect();
    assert_eq!(holds, vec![100.0, 100.0, 45.0, 0.0]);
    assert_eq!(s.delay_spent, Duration::from_secs(250));
}

#[tokio::test(start_paused = true)]
async fn orf_delay_counts_from_when_the_command_arrived() {
    let p = policy("[blacklist]\nips = [\"198.51.100.0/24\"]\n");
    let mut s = state(&p, BOT);
    let arrival = Instant::now();
    p.observe(&mut s, Step::Mail("a@b"));
    let c = p.command_delay(&mut s, Step::Mail("a@b"), None, arrival);
    // the MTA (or a DNS lookup) took 20 s: 40 s are left to wait
    tokio::time::advance(Duration::from_secs(20)).await;
    let d = p.settle(&mut s, c, 250);
    assert_eq!(
        release_at(arrival, arrival, Instant::now(), d),
        arrival + Duration::from_secs(60)
    );
    // the MTA took 70 s: the reply goes out as soon as it exists
    tokio::time::advance(Duration::from_secs(50)).await;
    assert_eq!(
        release_at(arrival, arrival, Instant::now(), d),
        Instant::now()
    );
}

#[tokio::test(start_paused = true)]
async fn pipelined_holds_add_up() {
    // RCPT threshold 2, 2 s, scaling 1.5: the 3rd, 4th and 5th RCPT are
    // held 2, 3 and 4 s. Sent in one write, they still take 9 s in all.
    let p = policy("[rcpt]\nthreshold = 2\ndelay = \"2s\"\nscaling = 1.5\n");
    let mut s = state(&p, BOT);
    let t0 = Instant::now();
    let mut previous = t0;
    for _ in 0..5 {
        let d = reply_hold(&p, &mut s, Step::Rcpt, 250);
        previous = release_at(t0, previous, t0, d);
    }
    assert_eq!(previous, t0 + Duration::from_secs(9));
    assert_eq!(s.delay_spent, Duration::from_secs(9));
}
