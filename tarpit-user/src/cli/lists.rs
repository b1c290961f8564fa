//! What `tarpit allow` and `tarpit block` share: add, delete and list
//! entries in the kernel's LPM tries, and keep the state file in step.
//!
//! The kernel and the state file are changed under the state file's lock,
//! kernel first: a change the kernel refuses (a full map) is never saved,
//! and two admins changing lists at once cannot interleave.
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use serde::Serialize;
use tarpit_common::lists::BlockReason;

use super::Context;
use super::kernel_glue::{AdminMaps, Clock, List, ListRow};
use super::output::{self, Align, Table};
use crate::config::Config;
use crate::state::{self, AllowEntry, BlockEntry, State, StateLock};

/// What `add` was asked to do.
pub struct AddRequest {
    pub net: IpNet,
    pub ttl: Option<Duration>,
    pub comment: Option<String>,
    pub all_ports: bool,
    /// Block list: hold in the kernel instead of dropping.
    pub hold: bool,
}

fn list_word(list: List) -> &'static str {
    match list {
        List::Allow => "allow",
        List::Block => "block",
    }
}

pub fn add(ctx: &Context, list: List, req: AddRequest) -> Result<()> {
    let mut maps = ctx.open()?;
    let _lock = StateLock::acquire(&ctx.state_file)?;
    let mut st = State::load(&ctx.state_file)?;
    let clock = Clock::now();
    maps.insert(
        list,
        &req.net,
        req.ttl,
        BlockReason::Manual,
        req.all_ports,
        req.hold,
    )?;
    let added_at = state::unix(clock.wall);
    let expires_at = req.ttl.map(|t| state::unix(clock.wall + t));
    match list {
        List::Allow => st.upsert_allow(AllowEntry {
            cidr: req.net,
            added_at,
            expires_at,
            comment: req.comment.clone(),
        }),
        List::Block => st.upsert_block(BlockEntry {
            cidr: req.net,
            added_at,
            expires_at,
            all_ports: req.all_ports,
            hold: req.hold,
            comment: req.comment.clone(),
        }),
    }
    st.prune_expired(added_at);
    st.save(&ctx.state_file).with_context(|| {
        format!(
            "{} is in the kernel's {} list now, but could not be saved for the next boot",
            req.net,
            list_word(list)
        )
    })?;
    let until = match req.ttl {
        Some(t) => format!(
            "until {}",
            output::human_time_rel(clock.wall + t, clock.wall)
        ),
        None => "with no expiry".to_string(),
    };
    let scope = match (list, req.all_ports, req.hold) {
        (List::Block, true, true) => ", SMTP ports held in the kernel, other ports dropped",
        (List::Block, false, true) => ", SMTP ports held in the kernel",
        (List::Block, true, false) => ", all ports",
        (List::Block, false, false) => ", SMTP ports",
        _ => "",
    };
    println!("{}: added {} {until}{scope}", list_word(list), req.net);
    Ok(())
}

pub fn del(ctx: &Context, list: List, net: IpNet) -> Result<()> {
    let mut maps = ctx.open()?;
    let _lock = StateLock::acquire(&ctx.state_file)?;
    let mut st = State::load(&ctx.state_file)?;
    let in_kernel = maps.remove(list, &net)?;
    let in_state = match list {
        List::Allow => st.remove_allow(&net),
        List::Block => st.remove_block(&net),
    };
    if in_state {
        st.save(&ctx.state_file).with_context(|| {
            format!(
                "{net} is out of the kernel's {} list now, but the state file still has it: \
                 the agent will put it back at its next start",
                list_word(list)
            )
        })?;
    }
    if !in_kernel && !in_state {
        bail!(
            "no {}-list entry for {net} (see `tarpit {} list`)",
            list_word(list),
            list_word(list)
        );
    }
    println!("{}: removed {net}", list_word(list));
    Ok(())
}

/// One entry of `allow list --json` / `block list --json` (docs/cli.md).
#[derive(Debug, Serialize)]
pub struct EntryJson {
    pub cidr: String,
    pub family: &'static str,
    pub added_at: Option<String>,
    pub expires_at: Option<String>,
    pub expires_in_secs: Option<u64>,
    pub active: bool,
    pub in_kernel: bool,
    pub saved: bool,
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_ports: Option<bool>,
    /// Block list: `drop` or `hold` (held in the kernel, no socket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    pub comment: Option<String>,
}

/// A kernel row or a saved-only entry, joined with its comment.
pub struct Joined {
    pub net: IpNet,
    pub kernel: Option<ListRow>,
    pub saved: bool,
    pub comment: Option<String>,
    pub added: Option<SystemTime>,
    pub expires: Option<SystemTime>,
    pub all_ports: bool,
    pub hold: bool,
}

impl Joined {
    /// A state-file entry the kernel does not hold (yet).
    fn saved_only(
        net: IpNet,
        added_at: u64,
        expires_at: Option<u64>,
        all_ports: bool,
        hold: bool,
        comment: &Option<String>,
    ) -> Joined {
        Joined {
            net,
            kernel: None,
            saved: true,
            comment: comment.clone(),
            added: Some(state::from_unix(added_at)),
            expires: expires_at.map(state::from_unix),
            all_ports,
            hold,
        }
    }

    /// Only what the kernel holds is in force.
    pub fn active(&self) -> bool {
        self.kernel.as_ref().is_some_and(|k| k.active)
    }

    /// Who put the entry there: `cli` (saved by `tarpit ... add`),
    /// `allow.ips` / `allow.internal` (the agent syncs the configuration),
    /// `agent` (a block for an offence), `other` (none of those: another
    /// tool, or a state file that was lost).
    pub fn source(&self, list: List, config: &Config) -> &'static str {
        if self.saved {
            return "cli";
        }
        match list {
            List::Allow => {
                if config.allow.ips.iter().any(|n| n.trunc() == self.net) {
                    "allow.ips"
                } else if config.allow.internal.iter().any(|n| n.trunc() == self.net) {
                    "allow.internal"
                } else {
                    "other"
                }
            }
            List::Block => match self.kernel.as_ref().and_then(|k| k.reason.as_deref()) {
                Some(r) if r != BlockReason::Manual.name() => "agent",
                _ => "other",
            },
        }
    }

    pub fn json(&self, list: List, config: &Config, now: SystemTime) -> EntryJson {
        EntryJson {
            source: self.source(list, config),
            cidr: self.net.to_string(),
            family: if self.net.addr().is_ipv4() {
                "ipv4"
            } else {
                "ipv6"
            },
            added_at: self.added.map(output::rfc3339),
            expires_at: self.expires.map(output::rfc3339),
            expires_in_secs: self.expires.map(|e| output::secs_until(e, now)),
            active: self.active(),
            in_kernel: self.kernel.is_some(),
            saved: self.saved,
            reason: match list {
                List::Block => Some(
                    self.kernel
                        .as_ref()
                        .and_then(|k| k.reason.clone())
                        .unwrap_or_else(|| BlockReason::Manual.name().to_string()),
                ),
                List::Allow => None,
            },
            all_ports: (list == List::Block).then_some(self.all_ports),
            action: (list == List::Block).then_some(if self.hold { "hold" } else { "drop" }),
            comment: self.comment.clone(),
        }
    }
}

/// The kernel's entries joined with the state file's comments, plus the
/// saved entries the kernel lacks (not restored yet: the agent restores
/// them at its next start).
pub fn joined(maps: &AdminMaps, st: &State, list: List, clock: &Clock) -> Result<Vec<Joined>> {
    let rows = maps.list(list, clock)?;
    let mut out: Vec<Joined> = rows
        .into_iter()
        .map(|k| {
            let (saved, comment) = match list {
                List::Allow => st
                    .allow_entry(&k.net)
                    .map(|e| (true, e.comment.clone()))
                    .unwrap_or((false, None)),
                List::Block => st
                    .block_entry(&k.net)
                    .map(|e| (true, e.comment.clone()))
                    .unwrap_or((false, None)),
            };
            Joined {
                net: k.net,
                saved,
                comment,
                added: Some(k.added),
                expires: k.expires,
                all_ports: k.all_ports,
                hold: k.hold,
                kernel: Some(k),
            }
        })
        .collect();
    let saved: Vec<Joined> = match list {
        List::Allow => st
            .allow
            .iter()
            .map(|e| Joined::saved_only(e.cidr, e.added_at, e.expires_at, false, false, &e.comment))
            .collect(),
        List::Block => st
            .block
            .iter()
            .map(|e| {
                Joined::saved_only(
                    e.cidr,
                    e.added_at,
                    e.expires_at,
                    e.all_ports,
                    e.hold,
                    &e.comment,
                )
            })
            .collect(),
    };
    let saved_only: Vec<Joined> = saved
        .into_iter()
        .filter(|s| !out.iter().any(|j| j.net == s.net))
        .collect();
    out.extend(saved_only);
    out.sort_by_key(|j| j.net);
    Ok(out)
}

/// The state file for reading only: a damaged file must not stop an admin
/// from seeing what the kernel holds, so it is reported and skipped (it is
/// never rewritten: `add` and `del` refuse until it is repaired).
pub fn state_for_reading(ctx: &Context) -> State {
    State::load(&ctx.state_file).unwrap_or_else(|e| {
        eprintln!("tarpit: warning: {e}; comments and saved entries are not shown");
        State::new()
    })
}

pub fn list(ctx: &Context, list: List, json: bool) -> Result<()> {
    let maps = ctx.open()?;
    let st = state_for_reading(ctx);
    let clock = Clock::now();
    let now = clock.wall;
    let entries = joined(&maps, &st, list, &clock)?;
    if json {
        let v: Vec<EntryJson> = entries
            .iter()
            .map(|e| e.json(list, &ctx.config, now))
            .collect();
        return output::print_json(&v);
    }
    let mut columns = vec![
        ("NETWORK", Align::Left),
        ("ADDED", Align::Left),
        ("EXPIRES", Align::Left),
    ];
    if list == List::Block {
        columns.push(("REASON", Align::Left));
        columns.push(("PORTS", Align::Left));
    }
    columns.push(("STATUS", Align::Left));
    columns.push(("SOURCE", Align::Left));
    columns.push(("COMMENT", Align::Left));
    let mut table = Table::new(&columns);
    for e in &entries {
        let mut row = vec![
            e.net.to_string(),
            e.added.map(output::human_time).unwrap_or_default(),
            output::expiry_cell(e.expires, now),
        ];
        if list == List::Block {
            row.push(
                e.kernel
                    .as_ref()
                    .and_then(|k| k.reason.clone())
                    .unwrap_or_else(|| "manual".into()),
            );
            // Held entries say so where the ports are: an extra column
            // would change the table every script reads.
            row.push(
                match (e.all_ports, e.hold) {
                    (false, false) => "smtp",
                    (true, false) => "all",
                    (false, true) => "smtp (hold)",
                    (true, true) => "all (smtp hold)",
                }
                .into(),
            );
        }
        row.push(status(e).into());
        row.push(e.source(list, &ctx.config).into());
        row.push(e.comment.clone().unwrap_or_default());
        table.row(row);
    }
    table.print(&format!("the {} list is empty", list_word(list)));
    Ok(())
}

/// `active`, `expired`, or `pending` (in the state file, not in the
/// kernel: the agent puts it back at its next start).
fn status(e: &Joined) -> &'static str {
    match &e.kernel {
        None => "pending",
        Some(_) if !e.active() => "expired",
        Some(_) => "active",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(net: &str, saved: bool, reason: Option<&str>) -> Joined {
        let now = SystemTime::now();
        Joined {
            net: net.parse().unwrap(),
            kernel: Some(ListRow {
                net: net.parse().unwrap(),
                added: now,
                expires: None,
                active: true,
                reason: reason.map(String::from),
                all_ports: false,
                hold: false,
            }),
            saved,
            comment: None,
            added: Some(now),
            expires: None,
            all_ports: false,
            hold: false,
        }
    }

    #[test]
    fn sources_tell_who_put_an_entry_there() {
        let config = Config::parse(
            "[allow]\nips = [\"198.51.100.0/24\"]\ninternal = [\"10.0.0.0/8\", \"::1/128\"]\n",
        )
        .unwrap();
        let allow = |net, saved| joined(net, saved, None).source(List::Allow, &config);
        assert_eq!(allow("198.51.100.0/24", false), "allow.ips");
        assert_eq!(allow("10.0.0.0/8", false), "allow.internal");
        assert_eq!(allow("::1/128", false), "allow.internal");
        assert_eq!(allow("198.51.100.0/24", true), "cli");
        assert_eq!(allow("203.0.113.0/24", false), "other");
        let block = |reason, saved| {
            joined("203.0.113.7/32", saved, Some(reason)).source(List::Block, &config)
        };
        assert_eq!(block("pregreet", false), "agent");
        assert_eq!(block("manual", true), "cli");
        assert_eq!(block("manual", false), "other");
    }

    #[test]
    fn only_what_the_kernel_holds_is_active() {
        let mut j = joined("198.51.100.0/24", true, None);
        assert!(j.active());
        assert_eq!(status(&j), "active");
        j.kernel.as_mut().unwrap().active = false;
        assert_eq!(status(&j), "expired");
        j.kernel = None;
        assert!(!j.active());
        assert_eq!(status(&j), "pending");
    }
}
