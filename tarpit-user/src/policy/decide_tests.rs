//! [`Policy::decide`] and [`Policy::explain`]: one test per event, and
//! the precedence both read.
use super::*;
use crate::config::ListAction;

fn policy(toml: &str) -> Policy {
    Policy::new(&Config::parse(toml).expect("test config"))
}

const BOT: &str = "198.51.100.9";

fn facts(ip: &str) -> Facts {
    Facts::new(ip.parse().unwrap(), false)
}

fn listed(action: ListAction) -> Dns {
    Dns::Listed {
        score: 5,
        action,
        reply: "554 5.7.1 Service unavailable; client blocked using bl.example".into(),
    }
}

fn cmd(p: &Policy, s: &mut SessionState, step: Step<'_>) -> Action {
    p.decide(
        s,
        Event::Command {
            step,
            now: Instant::now(),
            draining: false,
        },
    )
}

fn secs(a: &Action) -> u64 {
    a.hold.map_or(0, |d| d.duration.as_secs())
}

#[test]
fn connect_holds_the_banner_and_starts_the_lookups() {
    let p = policy("[greeting]\nteaser = \"mx ESMTP\"\n");
    let mut s = p.session(&facts(BOT));
    let a = p.decide(&mut s, Event::Connect);
    assert_eq!(secs(&a), 5);
    assert_eq!(a.reply.as_deref(), Some("220-mx ESMTP"));
    assert!(a.watch_pre_greet && a.look_up && !a.close);
    // internal: nothing at all, not even look-ups
    let mut s = p.session(&facts("127.0.0.1"));
    assert_eq!(p.decide(&mut s, Event::Connect), Action::default());
}

#[test]
fn a_dns_allow_ends_the_greeting_and_spares_the_client() {
    let p = policy("[rcpt]\nthreshold = 0\n[greylist]\nmode = \"triplet\"\n");
    let mut s = p.session(&facts(BOT));
    let allowed = Dns::Allowed("list.dnswl.example".into());
    assert!(p.decide(&mut s, Event::DnsKnown(&allowed)).exempt);
    assert!(!p.decide(&mut s, Event::DnsKnown(&Dns::Clean)).exempt);
    assert!(p.decide(&mut s, Event::GreetingOver(&allowed)).passes());
    let a = cmd(&p, &mut s, Step::Rcpt);
    assert_eq!((a.hold, a.greylist), (None, None));
}

#[test]
fn dnsbl_drop_closes_without_a_word_after_the_greeting() {
    let p = policy("");
    let mut s = p.session(&facts(BOT));
    let a = p.decide(&mut s, Event::GreetingOver(&listed(ListAction::Drop)));
    assert!(a.close && a.reply.is_none());
    // the master switch off: no DNS action
    let p = policy("enabled = false\n");
    let mut s = p.session(&facts(BOT));
    assert!(
        p.decide(&mut s, Event::GreetingOver(&listed(ListAction::Drop)))
            .passes()
    );
}

#[test]
fn dnsbl_reject_answers_every_rcpt_with_554_held_by_the_blacklist_delay() {
    let p = policy("");
    let mut s = p.session(&facts(BOT));
    assert!(
        p.decide(&mut s, Event::GreetingOver(&listed(ListAction::Reject)))
            .passes()
    );
    assert_eq!(secs(&cmd(&p, &mut s, Step::Helo("x"))), 0);
    assert_eq!(secs(&cmd(&p, &mut s, Step::Mail("a@b"))), 60);
    let a = cmd(&p, &mut s, Step::Rcpt);
    assert!(a.reply.as_deref().unwrap().starts_with("554 5.7.1"));
    assert_eq!(secs(&a), 60);
    let r = p.decide(
        &mut s,
        Event::Reply {
            code: 554,
            command: a.hold,
        },
    );
    assert_eq!(secs(&r), 60);
    // callout senders are rejected too (only their holds are lifted)
    let a = cmd(&p, &mut s, Step::Mail(""));
    assert_eq!(secs(&a), 0);
    let a = cmd(&p, &mut s, Step::Rcpt);
    assert!(a.reply.is_some() && a.hold.is_none());
}

#[test]
fn dnsbl_delay_blacklists_and_log_does_nothing() {
    let p = policy("");
    let mut s = p.session(&facts(BOT));
    p.decide(&mut s, Event::GreetingOver(&listed(ListAction::Delay)));
    assert_eq!(secs(&cmd(&p, &mut s, Step::Mail("a@b"))), 60);
    assert!(cmd(&p, &mut s, Step::Rcpt).reply.is_none());
    let mut s = p.session(&facts(BOT));
    p.decide(&mut s, Event::GreetingOver(&listed(ListAction::Log)));
    assert_eq!(secs(&cmd(&p, &mut s, Step::Mail("a@b"))), 0);
}

#[test]
fn internal_clients_are_never_rejected_by_dnsbl() {
    let p = policy("[allow]\ninternal = [\"198.51.100.0/24\"]\n");
    let mut s = p.session(&facts(BOT));
    p.decide(&mut s, Event::GreetingOver(&listed(ListAction::Reject)));
    cmd(&p, &mut s, Step::Mail("a@b"));
    assert!(cmd(&p, &mut s, Step::Rcpt).passes());
}

#[test]
fn connect_greylisting_asks_the_store_for_whom_it_applies() {
    let p = policy(
        "[greylist]\nmode = \"connect\"\n[exclude]\nallowlisted = false\n[allow]\nips = [\"198.51.100.10/32\"]\n",
    );
    let mut s = p.session(&facts(BOT));
    let a = p.decide(&mut s, Event::GreetingOver(&Dns::Unknown));
    assert_eq!(a.greylist, Some(GreyAsk::Connect));
    let no = p.decide(
        &mut s,
        Event::Greylist {
            ask: GreyAsk::Connect,
            passed: false,
        },
    );
    assert!(no.close && no.reply.as_deref().unwrap().starts_with("421 4.7.1"));
    let yes = p.decide(
        &mut s,
        Event::Greylist {
            ask: GreyAsk::Connect,
            passed: true,
        },
    );
    assert!(yes.passes());
    // allow-listed, even with exclude.allowlisted off: never greylisted
    let mut s = p.session(&facts("198.51.100.10"));
    assert!(
        p.decide(&mut s, Event::GreetingOver(&Dns::Unknown))
            .passes()
    );
    // triplet mode asks nothing at connect
    let p = policy("[greylist]\nmode = \"triplet\"\n");
    let mut s = p.session(&facts(BOT));
    assert!(
        p.decide(&mut s, Event::GreetingOver(&Dns::Unknown))
            .passes()
    );
}

#[test]
fn triplet_greylisting_answers_451_at_rcpt_and_goes_on() {
    let p = policy("[greylist]\nmode = \"triplet\"\n");
    let mut s = p.session(&facts(BOT));
    cmd(&p, &mut s, Step::Mail("a@b"));
    let a = cmd(&p, &mut s, Step::Rcpt);
    assert_eq!(a.greylist, Some(GreyAsk::Triplet));
    let no = p.decide(
        &mut s,
        Event::Greylist {
            ask: GreyAsk::Triplet,
            passed: false,
        },
    );
    assert!(!no.close && no.reply.as_deref().unwrap().starts_with("451 4.7.1"));
    // authenticated in the session: no more greylisting
    assert!(p.decide(&mut s, Event::Authenticated).remember_auth);
    assert_eq!(cmd(&p, &mut s, Step::Rcpt).greylist, None);
}

#[test]
fn pre_greet_talk_gets_554_held_by_the_reject_delay_and_closes() {
    let p = policy("[reject]\ndelay = \"30s\"\n");
    let mut s = p.session(&facts(BOT));
    p.decide(&mut s, Event::Connect);
    let a = p.decide(&mut s, Event::TalkedFirst);
    assert!(a.close);
    assert!(a.reply.as_deref().unwrap().starts_with("554 "));
    assert_eq!(secs(&a), 30);
}

#[test]
fn offences_are_rejected_sessions_and_unknown_recipients() {
    let p = policy("");
    let mut s = p.session(&facts(BOT));
    let sent = |code, rcpt, close, pre_greet| {
        Event::Sent(Sent {
            code,
            rcpt,
            close,
            pre_greet,
        })
    };
    let o = |s: &mut SessionState, e| p.decide(s, e).offence;
    use super::ports::Offence;
    assert_eq!(
        o(&mut s, sent(554, false, true, false)),
        Some(Offence::Rejected)
    );
    assert_eq!(
        o(&mut s, sent(550, true, false, false)),
        Some(Offence::UnknownRecipient)
    );
    assert_eq!(o(&mut s, sent(550, false, false, false)), None);
    assert_eq!(o(&mut s, sent(421, false, true, false)), None);
    // the pre-greet 554 is the kernel's strike, not counted twice
    assert_eq!(o(&mut s, sent(554, false, true, true)), None);
}

#[tokio::test(start_paused = true)]
async fn a_recent_auth_spares_new_sessions_only_once_per_day_is_on() {
    let t = Instant::now();
    tokio::time::advance(Duration::from_secs(3600)).await;
    let mut f = facts(BOT);
    f.last_auth = Some(t);
    let p = policy("[helo]\ndelay = \"5s\"\nauthenticated_once_per_day = true\n");
    let mut s = p.session(&f);
    assert!(s.authenticated);
    assert_eq!(p.decide(&mut s, Event::Connect), Action::default());
    let p = policy("[helo]\ndelay = \"5s\"\n");
    let mut s = p.session(&f);
    assert!(!s.authenticated);
    assert_eq!(secs(&p.decide(&mut s, Event::Connect)), 5);
    assert_eq!(secs(&cmd(&p, &mut s, Step::Helo("c"))), 5);
}

#[tokio::test(start_paused = true)]
async fn the_helo_once_per_day_rule_reads_the_time_of_the_event() {
    let p = policy(
        "[helo]\ndelay = \"5s\"\nauthenticated_once_per_day = true\n[exclude]\nauthenticated = false\n",
    );
    let mut f = facts(BOT);
    f.last_auth = Some(Instant::now());
    let mut s = p.session(&f);
    assert_eq!(secs(&cmd(&p, &mut s, Step::Helo("c"))), 0);
    tokio::time::advance(AUTH_TTL).await;
    let mut s = p.session(&f);
    assert_eq!(secs(&cmd(&p, &mut s, Step::Helo("c"))), 5);
}

#[test]
fn no_holds_while_the_agent_stops() {
    let p = policy("[blacklist]\nips = [\"198.51.100.0/24\"]\n");
    let mut s = p.session(&facts(BOT));
    let a = p.decide(
        &mut s,
        Event::Command {
            step: Step::Mail("a@b"),
            now: Instant::now(),
            draining: true,
        },
    );
    assert_eq!(a.hold, None);
}

#[test]
fn explain_follows_the_precedence() {
    let p = policy(
        "[allow]\nips = [\"198.51.100.1/32\"]\n[blacklist]\nips = [\"198.51.100.0/24\"]\n\
         [helo]\nauthenticated_once_per_day = true\n",
    );
    let v = |f: &Facts| p.explain(f).verdict;
    // allow beats block; block beats internal
    let mut f = facts(BOT);
    f.kernel_allow = Some("198.51.100.0/24".parse().unwrap());
    f.kernel_block = Some(Blocked {
        net: "198.51.100.9/32".parse().unwrap(),
        reason: "manual".into(),
        until: "until in 1h".into(),
        all_ports: true,
        hold: false,
    });
    assert_eq!(v(&f), "allow");
    f.kernel_allow = None;
    assert_eq!(v(&f), "block");
    assert!(p.explain(&f).reason.contains("every port"));
    // a hold entry is a block the kernel answers with a zero window
    if let Some(b) = f.kernel_block.as_mut() {
        b.hold = true;
    }
    assert_eq!(v(&f), "hold");
    assert!(p.explain(&f).reason.contains("held in kernel"));
    if let Some(b) = f.kernel_block.as_mut() {
        b.hold = false;
    }
    let mut lo = facts("127.0.0.1");
    assert_eq!(v(&lo), "internal");
    lo.kernel_block = f.kernel_block.clone();
    assert_eq!(v(&lo), "block");
    assert_eq!(v(&facts("198.51.100.1")), "allow");
    // authenticated beats the blacklist, the blacklist beats greylisting
    let mut a = facts(BOT);
    a.auth_note = Some("until in 2h".into());
    assert_eq!(v(&a), "authenticated");
    // without the once-per-day rule an AUTH entry spares no new session
    let off = policy("[blacklist]\nips = [\"198.51.100.0/24\"]\n");
    assert_eq!(off.explain(&a).verdict, "blacklisted");
    assert_eq!(v(&facts(BOT)), "blacklisted");
    let mut d = facts(BOT);
    d.dns = listed(ListAction::Reject);
    assert_eq!(v(&d), "dnsbl");
    assert!(p.explain(&d).reason.contains("554"), "{:?}", p.explain(&d));
    d.dns = Dns::Allowed("fcrdns mx.partner.example".into());
    assert_eq!(v(&d), "allow");
    assert_eq!(v(&facts("198.51.101.9")), "tarpit");
    // the master switch: after allow and block, before the rest
    let off = policy("enabled = false\n[blacklist]\nips = [\"198.51.100.0/24\"]\n");
    assert_eq!(off.explain(&facts(BOT)).verdict, "off");
    assert_eq!(off.explain(&facts("127.0.0.1")).verdict, "off");
    assert_eq!(off.explain(&f).verdict, "block");
}

#[test]
fn explain_greylisting_and_the_agent_agree() {
    let p = policy("[greylist]\nmode = \"connect\"\n");
    let mut f = facts(BOT);
    f.greylist = Grey::WouldGreylist;
    assert_eq!(p.explain(&f).verdict, "greylist");
    let mut s = p.session(&f);
    assert_eq!(
        p.decide(&mut s, Event::GreetingOver(&f.dns)).greylist,
        Some(GreyAsk::Connect)
    );
    f.greylist = Grey::Passed;
    assert_eq!(p.explain(&f).verdict, "tarpit");
    f.greylist = Grey::Unknown;
    assert_eq!(p.explain(&f).verdict, "greylist");
    let p = policy("[greylist]\nmode = \"triplet\"\n");
    assert_eq!(p.explain(&facts(BOT)).verdict, "greylist");
    assert_eq!(p.explain(&facts("127.0.0.1")).verdict, "internal");
}

#[test]
fn exclusions_off_leave_allow_listed_clients_to_the_tarpit() {
    let p = policy("[allow]\nips = [\"198.51.100.9/32\"]\n[exclude]\nallowlisted = false\n");
    let f = facts(BOT);
    assert_eq!(p.explain(&f).verdict, "tarpit");
    let mut s = p.session(&f);
    assert_eq!(secs(&p.decide(&mut s, Event::Connect)), 5);
    // a kernel allow entry still beats a block entry in XDP
    let mut f = facts("198.51.100.20");
    f.kernel_allow = Some("198.51.100.0/24".parse().unwrap());
    f.kernel_block = Some(Blocked {
        net: "198.51.100.20/32".parse().unwrap(),
        reason: "manual".into(),
        until: String::new(),
        all_ports: false,
        hold: false,
    });
    assert_eq!(p.explain(&f).verdict, "tarpit");
}

#[test]
fn internal_and_allow_listed_addresses_are_never_sanctioned() {
    let p = policy("[allow]\nips = [\"198.51.100.0/28\"]\n[exclude]\nallowlisted = false\n");
    let ip = |s: &str| s.parse().unwrap();
    let never = |s: &str, k| p.precedence.never_sanctioned(ip(s), k);
    assert_eq!(never("::ffff:127.0.0.1", false), Some("internal"));
    assert_eq!(never(BOT, false), Some("allow-listed"));
    assert_eq!(never("198.51.100.99", true), Some("allow-listed"));
    assert_eq!(never("198.51.100.99", false), None);
}
