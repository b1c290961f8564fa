//! `tarpit ip ADDR`: everything known about one address, and what the
//! tarpit would do to it now.
use std::net::IpAddr;
use std::time::SystemTime;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::Context;
use super::args::parse_ip;
use super::auth::AuthJson;
use super::kernel_glue::{AuthRow, Clock, IpRow, List, ListRow};
use super::lists::{EntryJson, Joined, joined};
use super::output::{self, human_time_rel};
use crate::config::Config;
use crate::policy::{Blocked, Facts, Policy};

#[derive(Debug, Args)]
pub struct IpArgs {
    /// IPv4 or IPv6 address (::ffff:a.b.c.d is the same as a.b.c.d).
    #[arg(value_name = "ADDR", value_parser = parse_ip)]
    pub addr: IpAddr,
    /// Print JSON (one object; fields in docs/cli.md).
    #[arg(long)]
    pub json: bool,
    /// Skip the DNS look-ups (DNSBL, DNSWL, `allow.hosts`) the agent would
    /// make: the verdict is then what applies before their answer.
    #[arg(long)]
    pub no_dns: bool,
}

/// `tarpit ip --json` (docs/cli.md).
#[derive(Debug, Serialize)]
struct IpJson {
    ip: String,
    family: &'static str,
    allow: Vec<EntryJson>,
    block: Vec<EntryJson>,
    authenticated: Option<AuthJson>,
    slowed: Option<AuthJson>,
    /// SYNs to an SMTP port seen by XDP (dropped ones included).
    syns: u64,
    state: Option<StateJson>,
    policy: PolicyJson,
    /// With `[cluster]`: what Redis says of the blocks that cover the
    /// address (and of the address itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterJson>,
}

/// `cluster` in `tarpit ip --json`.
#[derive(Debug, Serialize)]
struct ClusterJson {
    /// Redis could not be asked (why); the rest is then empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    blocks: Vec<ClusterEntryJson>,
    /// Run-time allow entries (`tarpit allow add` at some node).
    allow: Vec<ClusterEntryJson>,
}

#[derive(Debug, Serialize)]
struct ClusterEntryJson {
    cidr: String,
    /// The node that made the change.
    node: String,
    at: String,
    /// `block` (or `allow`), or `deleted` (a tombstone).
    change: &'static str,
    expires_at: Option<String>,
    /// The admin's comment at that node (`--comment`).
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    /// In this host's kernel now.
    here: bool,
}

/// What Redis says of the blocks and allow entries covering `ip` (the
/// covering kernel entries' networks, and the address's own), as JSON and
/// as lines.
fn cluster_view(
    config: &Config,
    ip: IpAddr,
    allow: &[Joined],
    block: &[Joined],
    now: SystemTime,
) -> Option<(ClusterJson, Vec<String>)> {
    use crate::cluster::record::{SharedList, shown_comment};
    if !config.cluster.enabled() {
        return None;
    }
    let own = ipnet::IpNet::from(super::kernel_glue::canonical(ip));
    let mut asked = Vec::new();
    for (list, covering) in [(SharedList::Block, block), (SharedList::Allow, allow)] {
        let mut nets: Vec<ipnet::IpNet> = covering.iter().map(|j| j.net).collect();
        if !nets.contains(&own) {
            nets.push(own);
        }
        asked.extend(nets.into_iter().map(|n| (list, n)));
    }
    let records = match crate::cluster::lookup::records_of(&config.cluster, &asked) {
        Ok(r) => r,
        Err(e) => {
            let json = ClusterJson {
                error: Some(format!("{e:#}")),
                blocks: Vec::new(),
                allow: Vec::new(),
            };
            return Some((json, vec![format!("Redis not asked: {e:#}")]));
        }
    };
    let mut lines = Vec::new();
    let mut json = ClusterJson {
        error: None,
        blocks: Vec::new(),
        allow: Vec::new(),
    };
    for r in &records {
        let (covering, verb) = match r.list {
            SharedList::Allow => (allow, "allowed"),
            _ => (block, "blocked"),
        };
        let at = crate::state::from_unix(r.at / 1000);
        let in_kernel = covering.iter().any(|j| j.net == r.net && j.active());
        let when = human_time_rel(at, now);
        // Written into Redis by anyone who may write there: shown tamed.
        let node = shown_comment(Some(&r.node)).unwrap_or_else(|| "?".into());
        let comment = if r.deleted {
            None
        } else {
            shown_comment(r.comment.as_deref())
        };
        lines.push(if r.deleted {
            let what = match r.list {
                SharedList::Allow => "allow entry ",
                _ => "",
            };
            format!("{} {what}deleted by {node} {when}", r.net)
        } else {
            let until = match r.expires_at {
                Some(e) => format!(
                    ", until {}",
                    human_time_rel(crate::state::from_unix(e), now)
                ),
                None => ", no expiry".into(),
            };
            let applied = match (in_kernel, r.list) {
                (true, _) => "",
                (false, SharedList::Allow) => ", not in the allow list here (expired)",
                (false, _) => ", not applied here (allow list, internal network or expired)",
            };
            let said = comment
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            format!("{} {verb} by {node} {when}{until}{applied}{said}", r.net)
        });
        let entry = ClusterEntryJson {
            cidr: r.net.to_string(),
            node,
            at: output::rfc3339(at),
            change: match (r.deleted, r.list) {
                (true, _) => "deleted",
                (false, SharedList::Allow) => "allow",
                (false, _) => "block",
            },
            expires_at: r
                .expires_at
                .map(|e| output::rfc3339(crate::state::from_unix(e))),
            comment,
            here: in_kernel,
        };
        match r.list {
            SharedList::Allow => json.allow.push(entry),
            _ => json.blocks.push(entry),
        }
    }
    if lines.is_empty() {
        lines.push("nothing shared about this address".into());
    }
    Some((json, lines))
}

#[derive(Debug, Serialize)]
struct StateJson {
    first_seen: Option<String>,
    last_seen: Option<String>,
    last_strike: Option<String>,
    conns_live: u64,
    conns_total: u64,
    strikes: u32,
    flags: Vec<&'static str>,
}

/// `policy` in `tarpit ip --json`: [`crate::policy::Policy::explain`]'s
/// verdict and reason.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PolicyJson {
    /// `allow`, `block`, `off`, `internal`, `authenticated`, `dnsbl`,
    /// `blacklisted`, `greylist`, `tarpit`.
    pub verdict: &'static str,
    /// One sentence for people.
    pub reason: String,
}

/// What the kernel's maps say about one address.
#[derive(Debug, Default)]
pub struct KernelView {
    /// Matching allow-list entries, longest prefix first.
    pub allow: Vec<ListRow>,
    /// Matching block-list entries, longest prefix first.
    pub block: Vec<ListRow>,
    pub auth: Option<AuthRow>,
    pub slowed: Option<AuthRow>,
    pub state: Option<IpRow>,
}

/// The policy's facts about `ip` from the kernel's view (expiries in
/// words, relative to `now`). The DNS and greylist facts are left
/// unknown here: [`dns_facts`] fills them.
pub fn facts(ip: IpAddr, k: &KernelView, now: SystemTime) -> Facts {
    let until = |e: Option<SystemTime>| e.map(|e| format!("until {}", human_time_rel(e, now)));
    let mut f = Facts::new(ip, false);
    f.kernel_allow = k.allow.iter().find(|r| r.active).map(|r| r.net);
    f.kernel_block = k.block.iter().find(|r| r.active).map(|b| Blocked {
        net: b.net,
        reason: b.reason.clone().unwrap_or_else(|| "manual".into()),
        until: until(b.expires).unwrap_or_else(|| "with no expiry".into()),
        all_ports: b.all_ports,
        hold: b.hold,
    });
    f.auth_note = k
        .auth
        .as_ref()
        .filter(|a| a.active)
        .map(|a| until(a.expires).unwrap_or_default());
    f.clamped = k
        .slowed
        .as_ref()
        .filter(|s| s.active)
        .map(|s| until(s.expires).unwrap_or_default());
    f.pregreet_strikes = k.state.as_ref().map_or(0, |s| s.strikes);
    f
}

/// Longest wait for the DNS look-ups (the agent's own deadline,
/// `dns.timeout`, applies too).
const DNS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// What DNS says of the address (`Facts::dns`): the look-ups the agent
/// makes at connect (`crate::reputation`, the config's resolvers and
/// lists), when any list or `allow.hosts` is configured. A look-up that
/// fails or times out counts as "not listed", as it does for the agent.
///
/// The greylist store is not read (`Facts::greylist` stays unknown: in
/// connect mode the verdict assumes the address did not pass).
fn dns_facts(config: &Config, f: &mut Facts) {
    let Some(ip) = f.ip else { return };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let verdict = rt.block_on(async {
        let rep = crate::reputation::Reputation::from_config(config, Default::default()).ok()?;
        if !rep.is_active() {
            return None;
        }
        let mut h = rep.start_lookups(ip);
        let v = tokio::time::timeout(DNS_WAIT, h.verdict()).await.ok()?;
        Some(v.facts())
    });
    if let Some(dns) = verdict {
        f.dns = dns;
    }
}

/// What applies to the address now, by the agent's own precedence.
pub fn explain(config: &Config, f: &Facts) -> PolicyJson {
    let e = Policy::new(config).explain(f);
    PolicyJson {
        verdict: e.verdict,
        reason: e.reason,
    }
}

pub fn run(ctx: &Context, args: IpArgs) -> Result<()> {
    let maps = ctx.open()?;
    let st = super::lists::state_for_reading(ctx);
    let clock = Clock::now();
    let now = clock.wall;
    let ip = args.addr;
    // Each list is read once: the kernel's entries that cover the address,
    // longest prefix first, joined with the state file's notes.
    let covering = |list: List| -> Result<Vec<Joined>> {
        let canonical = super::kernel_glue::canonical(ip);
        let mut v: Vec<Joined> = joined(&maps, &st, list, &clock)?
            .into_iter()
            .filter(|j| j.kernel.is_some() && j.net.contains(&canonical))
            .collect();
        v.sort_by_key(|j| std::cmp::Reverse(j.net.prefix_len()));
        Ok(v)
    };
    let allow_joined = covering(List::Allow)?;
    let block_joined = covering(List::Block)?;
    let rows =
        |v: &[Joined]| -> Vec<ListRow> { v.iter().filter_map(|j| j.kernel.clone()).collect() };
    let view = KernelView {
        allow: rows(&allow_joined),
        block: rows(&block_joined),
        auth: maps.auth_get(ip, &clock)?,
        slowed: maps.slow_get(ip, &clock)?,
        state: maps.ip_state(ip, &clock)?,
    };
    let mut known = facts(ip, &view, now);
    if !args.no_dns {
        dns_facts(&ctx.config, &mut known);
    }
    let policy = explain(&ctx.config, &known);
    let syns = maps.syn_count(ip)?;
    let KernelView {
        allow,
        block,
        auth,
        slowed,
        state,
    } = view;
    let allow_json: Vec<EntryJson> = allow_joined
        .iter()
        .map(|j| j.json(List::Allow, &ctx.config, now))
        .collect();
    let block_json: Vec<EntryJson> = block_joined
        .iter()
        .map(|j| j.json(List::Block, &ctx.config, now))
        .collect();
    let (cluster_json, cluster_lines) =
        match cluster_view(&ctx.config, ip, &allow_joined, &block_joined, now) {
            Some((j, l)) => (Some(j), l),
            None => (None, Vec::new()),
        };

    if args.json {
        let state_json = state.as_ref().map(|s| StateJson {
            first_seen: s.first_seen.map(output::rfc3339),
            last_seen: s.last_seen.map(output::rfc3339),
            last_strike: s.last_strike.map(output::rfc3339),
            conns_live: s.conns_live,
            conns_total: s.conns_total,
            strikes: s.strikes,
            flags: s.flags.clone(),
        });
        return output::print_json(&IpJson {
            ip: ip.to_string(),
            family: if ip.is_ipv4() { "ipv4" } else { "ipv6" },
            allow: allow_json,
            block: block_json,
            authenticated: auth.as_ref().map(|a| AuthJson::new(a, now)),
            slowed: slowed.as_ref().map(|a| AuthJson::new(a, now)),
            syns,
            state: state_json,
            policy,
            cluster: cluster_json,
        });
    }

    let mut lines: Vec<(String, String)> = Vec::new();
    let entry_text = |e: &EntryJson, row: &ListRow| -> String {
        let mut s = e.cidr.clone();
        match row.expires {
            Some(t) if row.active => s += &format!(", until {}", human_time_rel(t, now)),
            Some(t) => s += &format!(", expired {}", human_time_rel(t, now)),
            None => s += ", no expiry",
        }
        if let Some(r) = &e.reason {
            s += &format!(", reason {r}");
        }
        if e.all_ports == Some(true) {
            s += ", all ports";
        }
        if e.action == Some("hold") {
            s += ", held in kernel";
        }
        if let Some(c) = &e.comment {
            s += &format!(" ({c})");
        }
        s
    };
    if allow.is_empty() {
        lines.push(("allow list".into(), "no".into()));
    }
    for (e, r) in allow_json.iter().zip(&allow) {
        lines.push(("allow list".into(), entry_text(e, r)));
    }
    if block.is_empty() {
        lines.push(("block list".into(), "no".into()));
    }
    for (e, r) in block_json.iter().zip(&block) {
        lines.push(("block list".into(), entry_text(e, r)));
    }
    for l in cluster_lines {
        lines.push(("cluster".into(), l));
    }
    lines.push((
        "authenticated".into(),
        match &auth {
            None => "no".into(),
            Some(a) => match (a.active, a.expires) {
                (true, Some(t)) => format!("until {}", human_time_rel(t, now)),
                (true, None) => "yes, no expiry".into(),
                (false, Some(t)) => format!("expired {}", human_time_rel(t, now)),
                (false, None) => "no".into(),
            },
        },
    ));
    if let Some(sl) = &slowed {
        lines.push((
            "slowed down".into(),
            match (sl.active, sl.expires) {
                (true, Some(t)) => format!("TCP window clamped until {}", human_time_rel(t, now)),
                (true, None) => "TCP window clamped, no expiry".into(),
                (false, Some(t)) => format!("expired {}", human_time_rel(t, now)),
                (false, None) => "no".into(),
            },
        ));
    }
    if syns > 0 {
        lines.push(("SYNs to SMTP".into(), syns.to_string()));
    }
    match &state {
        None => lines.push(("history".into(), "never seen by the kernel".into())),
        Some(s) => {
            let t = |x: Option<SystemTime>| {
                x.map(|t| human_time_rel(t, now))
                    .unwrap_or_else(|| "-".into())
            };
            lines.push(("first seen".into(), t(s.first_seen)));
            lines.push(("last seen".into(), t(s.last_seen)));
            lines.push((
                "connections".into(),
                format!("{} live, {} in total", s.conns_live, s.conns_total),
            ));
            lines.push((
                "pre-greet strikes".into(),
                match s.last_strike {
                    Some(t) if s.strikes > 0 => {
                        format!("{}, last {}", s.strikes, human_time_rel(t, now))
                    }
                    _ => s.strikes.to_string(),
                },
            ));
            if !s.flags.is_empty() {
                lines.push(("flags".into(), s.flags.join(", ")));
            }
        }
    }
    lines.push((
        "policy now".into(),
        format!("{}: {}", policy.verdict, policy.reason),
    ));

    println!("{ip}");
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in lines {
        println!("  {k:<width$}  {v}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The policy for `ip` under the default config.
    fn judge(ip: IpAddr, view: KernelView, now: SystemTime) -> PolicyJson {
        explain(&Config::default(), &facts(ip, &view, now))
    }

    fn row(net: &str, active: bool, all_ports: bool) -> ListRow {
        let now = SystemTime::now();
        ListRow {
            net: net.parse().unwrap(),
            added: now,
            expires: Some(now + Duration::from_secs(60)),
            active,
            reason: Some("manual".into()),
            all_ports,
            hold: false,
        }
    }

    #[test]
    fn a_hold_entry_says_held_in_kernel_and_allow_still_wins() {
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let now = SystemTime::now();
        let mut held = row("198.51.100.0/24", true, false);
        held.hold = true;
        let view = KernelView {
            block: vec![held.clone()],
            ..Default::default()
        };
        let p = judge(ip, view, now);
        assert_eq!(p.verdict, "hold");
        assert!(p.reason.contains("held in kernel"), "{}", p.reason);
        let view = KernelView {
            allow: vec![row("198.51.100.7/32", true, false)],
            block: vec![held],
            ..Default::default()
        };
        assert_eq!(judge(ip, view, now).verdict, "allow");
    }

    #[test]
    fn allow_beats_block_and_expired_entries_do_not_count() {
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let now = SystemTime::now();
        let allow = [row("198.51.100.0/24", true, false)];
        let block = [row("198.51.100.7/32", true, true)];
        assert_eq!(
            judge(
                ip,
                KernelView {
                    allow: allow.to_vec(),
                    block: block.to_vec(),
                    ..Default::default()
                },
                now
            )
            .verdict,
            "allow"
        );
        let expired_allow = [row("198.51.100.0/24", false, false)];
        let p = judge(
            ip,
            KernelView {
                allow: expired_allow.to_vec(),
                block: block.to_vec(),
                ..Default::default()
            },
            now,
        );
        assert_eq!(p.verdict, "block");
        assert!(p.reason.contains("every port"), "{}", p.reason);
        let expired_block = [row("198.51.100.7/32", false, false)];
        assert_eq!(
            judge(
                ip,
                KernelView {
                    block: expired_block.to_vec(),
                    ..Default::default()
                },
                now
            )
            .verdict,
            "tarpit"
        );
    }

    #[test]
    fn internal_and_authenticated() {
        let now = SystemTime::now();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(judge(lo, KernelView::default(), now).verdict, "internal");
        let ip: IpAddr = "fd5b:1e00::2".parse().unwrap();
        let auth = AuthRow {
            ip,
            added: now,
            expires: Some(now + Duration::from_secs(3600)),
            active: true,
        };
        assert_eq!(
            judge(
                ip,
                KernelView {
                    auth: Some(auth.clone()),
                    ..Default::default()
                },
                now
            )
            .verdict,
            "tarpit",
            "with the default config (no once-per-day rule) the agent tarpits a new session"
        );
        let mut once = Config::default();
        once.helo.authenticated_once_per_day = true;
        let view = KernelView {
            auth: Some(auth),
            ..Default::default()
        };
        assert_eq!(
            explain(&once, &facts(ip, &view, now)).verdict,
            "authenticated"
        );
    }

    #[test]
    fn strikes_are_mentioned() {
        let now = SystemTime::now();
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        let s = IpRow {
            ip,
            first_seen: Some(now),
            last_seen: Some(now),
            last_strike: Some(now),
            conns_live: 0,
            conns_total: 3,
            strikes: 2,
            flags: vec!["pregreet"],
        };
        let p = judge(
            ip,
            KernelView {
                state: Some(s),
                ..Default::default()
            },
            now,
        );
        assert_eq!(p.verdict, "tarpit");
        assert!(p.reason.contains("2 times"), "{}", p.reason);
    }

    #[test]
    fn a_clamped_window_is_mentioned_until_it_expires() {
        let now = SystemTime::now();
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        let slowed = |active| AuthRow {
            ip,
            added: now,
            expires: Some(now + Duration::from_secs(600)),
            active,
        };
        let facts = KernelView {
            slowed: Some(slowed(true)),
            ..Default::default()
        };
        let p = judge(ip, facts, now);
        assert!(
            p.reason.contains("TCP window is clamped until"),
            "{}",
            p.reason
        );
        let facts = KernelView {
            slowed: Some(slowed(false)),
            ..Default::default()
        };
        assert!(!judge(ip, facts, now).reason.contains("clamped"));
    }

    #[test]
    fn the_master_switch_and_the_blacklist_are_the_agents() {
        let now = SystemTime::now();
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        let off = Config::parse("enabled = false\n").unwrap();
        let p = explain(&off, &facts(ip, &KernelView::default(), now));
        assert_eq!(p.verdict, "off", "{}", p.reason);
        let bl = Config::parse("[blacklist]\nips = [\"198.51.100.0/24\"]\n").unwrap();
        let p = explain(&bl, &facts(ip, &KernelView::default(), now));
        assert_eq!(p.verdict, "blacklisted", "{}", p.reason);
        // a kernel block still comes first: XDP drops it before the agent
        let view = KernelView {
            block: vec![row("198.51.100.9/32", true, false)],
            ..Default::default()
        };
        assert_eq!(explain(&off, &facts(ip, &view, now)).verdict, "block");
    }

    #[test]
    fn dns_look_ups_only_with_lists_and_a_silent_server_is_not_a_listing() {
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        let mut f = Facts::new(ip, false);
        dns_facts(&Config::default(), &mut f);
        assert_eq!(f.dns, crate::policy::Dns::Unknown);
        // A name server on loopback that never answers.
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = Config::parse(&format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout = \"200ms\"\n\
             [dnsbl]\nsites = [\"bl.example\"]\n",
            sink.local_addr().unwrap()
        ))
        .unwrap();
        dns_facts(&config, &mut f);
        assert_eq!(f.dns, crate::policy::Dns::Clean);
        assert_eq!(explain(&config, &f).verdict, "tarpit");
    }
}
