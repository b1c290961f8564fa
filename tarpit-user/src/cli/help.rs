//! The man-page parts of `--help`: examples, exit status, files. Kept
//! apart from the clap definitions so the option docs stay readable.

/// Exit status shared by every inspection command.
macro_rules! exit_status {
    () => {
        "EXIT STATUS:
  0  success
  1  error: not root (\"needs root or CAP_BPF\"), no pinned maps (agent never
     started, or detached), maps of another tarpit version, a full map, an
     unknown entry, an unreadable state file
  2  usage error: unknown option, bad address, prefix or duration"
    };
}

/// Files shared by every inspection command.
macro_rules! files {
    () => {
        "FILES:
  /etc/tarpit/tarpit.toml     configuration (-c); kernel.pin_path, state.file
  /sys/fs/bpf/tarpit/         pinned maps (--pin-path, kernel.pin_path)
  /var/lib/tarpit/state.json  run-time allow and block entries (state.file)"
    };
}

pub const MAIN: &str = concat!(
    "EXAMPLES:
  tarpit run -c /etc/tarpit/tarpit.toml     start the agent
  tarpit ip 203.0.113.7                     why is this address slow?
  tarpit block add 203.0.113.0/24 --ttl 1d --comment \"botnet\"
  tarpit allow add 2001:db8:5::/48 --comment \"partner MX\"
  tarpit top                                worst addresses, live
  tarpit stats --json | jq .kernel

",
    exit_status!(),
    "

",
    files!(),
    "

See docs/cli.md for the --json field reference."
);

pub const RUN: &str = "EXAMPLES:
  tarpit run -c /etc/tarpit/tarpit.toml
  RUST_LOG=debug tarpit run -c ./tarpit.toml

EXIT STATUS:
  0  stopped by SIGTERM or Ctrl-C
  1  the configuration is invalid, or the kernel programs could not be
     loaded or attached (the reason is printed)

FILES:
  /etc/tarpit/tarpit.toml     configuration (-c)
  /sys/fs/bpf/tarpit/         pinned maps and links (kernel.pin_path)
  /var/lib/tarpit/state.json  run-time allow and block entries, loaded at start";

pub const CHECK_CONFIG: &str = "EXAMPLES:
  tarpit check-config -c /etc/tarpit/tarpit.toml && systemctl reload tarpit

EXIT STATUS:
  0  the file is valid
  1  it is not: the key (e.g. kernel.smtp_ports) and the reason are printed

FILES:
  /etc/tarpit/tarpit.toml  the default configuration file";

pub const IP: &str = concat!(
    "The address may be IPv4 or IPv6; an IPv4-mapped IPv6 address
(::ffff:a.b.c.d) is the same as its IPv4 form. Times are shown in UTC.

EXAMPLES:
  tarpit ip 203.0.113.7
  tarpit ip 2001:db8::25 --json

",
    exit_status!(),
    "

",
    files!()
);

pub const ALLOW: &str = concat!(
    "Allow-listed sources always pass XDP, even when a block entry also
matches them, and the agent applies no delay to them. An entry is an
address (a host) or a network in CIDR form; IPv4 and IPv6. Changes take
effect in the kernel at once and are written to the state file, so they
survive a reboot (the agent loads the file at start).

EXAMPLES:
  tarpit allow add 198.51.100.0/24 --comment \"partner relays\"
  tarpit allow add 2001:db8::25 --ttl 7d
  tarpit allow del 198.51.100.0/24
  tarpit allow list --json

",
    exit_status!(),
    "

",
    files!()
);

pub const BLOCK: &str = concat!(
    "Block-listed sources are dropped by XDP on the SMTP ports (on every port
with --all-ports) before a socket, a SYN cookie or a process exists. An
allow-list entry wins over a block entry. With --hold, XDP instead answers
the source's connections to the SMTP ports itself with a zero window and a
SYN cookie: the bot's connect() succeeds and it waits for a banner that
never comes, while this host keeps no socket (Linux 6.0+; dropped on older
kernels). Entries with a --ttl expire in the
kernel by themselves, with or without the agent. Changes take effect at
once and are written to the state file, so they survive a reboot.

EXAMPLES:
  tarpit block add 203.0.113.0/24 --ttl 1d --comment \"botnet C&C\"
  tarpit block add 2001:db8:bad::/48 --all-ports
  tarpit block add 203.0.113.66 --hold --ttl 12h
  tarpit block del 203.0.113.0/24
  tarpit block list
  tarpit block list --json | jq -r '.[] | select(.reason == \"pregreet\") | .cidr'

",
    exit_status!(),
    "

",
    files!()
);

pub const AUTH: &str = concat!(
    "The agent adds a client's address here when the MTA accepts its SMTP AUTH;
an authenticated address skips the tarpit delays (and, with
helo.authenticated_once_per_day, pays the HELO delay once a day). Entries
expire by themselves (24 h by default). They are not written to the state
file: authentication is a fact of the moment, not configuration.

EXAMPLES:
  tarpit auth list
  tarpit auth add 198.51.100.25 --ttl 2h
  tarpit auth del 198.51.100.25

",
    exit_status!(),
    "

",
    files!()
);

pub const MAPS: &str = concat!(
    "In use is the number of keys present (for arrays: their size). A list
or hash map at capacity refuses new entries (LRU maps evict their oldest).

EXAMPLES:
  tarpit maps
  tarpit maps --json

",
    exit_status!(),
    "

",
    files!()
);

pub const STATS: &str = concat!(
    "Kernel counters are summed over the CPUs since the programs were first
loaded (they survive agent restarts). The agent's metrics are read from its
Prometheus endpoint (metrics.listen) when it answers.

EXAMPLES:
  tarpit stats
  tarpit stats --json | jq .kernel.xdp_drop

",
    exit_status!(),
    "

",
    files!()
);

pub const TOP: &str = concat!(
    "Addresses are ranked by pre-greet strikes, then live connections, then
connections in total. The header shows the kernel counters and their rate
per second. Keys: q, Esc or Ctrl-C quit; s changes the sort column;
p pauses. Each refresh reads every address the kernel remembers; on a box
that tracks hundreds of thousands, use a longer --interval.

EXAMPLES:
  tarpit top
  tarpit top --interval 5s --limit 50

",
    exit_status!(),
    "

",
    files!()
);

pub const DETACH: &str = concat!(
    "Removes the XDP, tc and sock_ops programs of tarpit from every interface and
cgroup they were attached to, the clsact qdiscs tarpit created, and every pin
under the pin directory (which drops the kernel's state: lists, counters,
per-address history). The state file is kept, so the next `tarpit run`
restores the run-time allow and block entries. Stop the agent first.

EXAMPLES:
  systemctl stop tarpit && tarpit detach

",
    exit_status!(),
    "

",
    files!()
);

pub const MAN: &str = "Writes one roff page per command, from the same text as --help:
tarpit.1, tarpit-run.1, tarpit-block-add.1 and so on. Needs no root and no
configuration.

EXAMPLES:
  tarpit man /usr/local/share/man/man1 && mandb -q
  tarpit man /tmp/pages && man -l /tmp/pages/tarpit-block-add.1

EXIT STATUS:
  0  success
  1  error: the directory cannot be created or a page cannot be written
  2  usage error: no directory given";
