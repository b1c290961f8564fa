#!/usr/bin/env bash
# Installs what tarpit's tests need, idempotently: Debian packages (only the
# missing ones, with one apt-get update), and bpffs. Run as root.
set -euo pipefail

packages=(
  postfix            # the MTA behind the tarpit, smtp-source/smtp-sink, postscreen
  swaks              # scripted SMTP client
  libio-socket-inet6-perl  # swaks -6
  rbldnsd            # local DNSBL
  bpftool            # independent look at programs and maps
  iproute2           # ip netns, veth
  iputils-ping
  tcpdump
  python3            # raw-socket protocol abuse clients
  tmux               # driving `tarpit top`
  dnsmasq-base       # local DNS with PTR/A/AAAA records (no service)
  dovecot-core       # SASL auth service for AUTH tests
  nftables           # benchmark baseline
  procps
  lintian            # checks the .deb of `cargo xtask deb` (package_deb.rs)
  prometheus         # scrapes a live agent for the dashboard test (ops_dashboard.rs)
  systemd            # systemd-analyze verify / systemd-sysusers on the shipped unit (ops tests)
  redis-server       # the shared state of several MX hosts (cluster_*.rs); redis-cli comes with it
  openssl            # throw-away certificates (tls_cert.rs, Redis's TLS port in cluster_redis.rs)
)

missing=()
for p in "${packages[@]}"; do
  [[ $p == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's package scripts would start services; nothing here must run by itself.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# Exim, for the tests with Exim behind the tarpit (tests/tests/mta_exim.rs).
# Debian's exim4-daemon-* conflicts with postfix (both provide
# mail-transport-agent): installing it would remove Postfix. So the packages
# are only downloaded and unpacked into a project-local root, .tools/exim,
# with the libraries exim4 links against; the tests run
# LD_LIBRARY_PATH=.tools/exim/usr/lib/x86_64-linux-gnu .tools/exim/usr/sbin/exim4 -C CONF.
# -heavy, not -light: only -heavy is built with PROXY protocol support.
exim_root="$(cd "$(dirname "$0")/.." && pwd)/.tools/exim"
if [[ ! -x $exim_root/usr/sbin/exim4 ]]; then
  echo "unpacking Exim (exim4-daemon-heavy) into $exim_root (not installed: it would remove Postfix)"
  exim_debs=(exim4-base exim4-daemon-heavy libidn12 libgnutls-dane0 libunbound8 libevent-2.1-7
             libmariadb3 mariadb-common libspf2-2 libpq5 libperl5.36 libldap-2.5-0 libsasl2-2)
  tmp=$(mktemp -d); chmod 755 "$tmp"
  if ! (cd "$tmp" && apt-get download -qq "${exim_debs[@]}" 2>/dev/null); then
    apt-get update -qq
    (cd "$tmp" && apt-get download -qq "${exim_debs[@]}")
  fi
  rm -rf "$exim_root.new"; mkdir -p "$exim_root.new"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$exim_root.new"; done
  rm -rf "$tmp" "$exim_root"; mv "$exim_root.new" "$exim_root"
fi
# Not setuid: a setuid binary ignores LD_LIBRARY_PATH (secure execution), and
# the daemon re-executes itself (as Debian-exim) for every delivery.
chmod u-s "$exim_root/usr/sbin/exim4"
# exim4 looks up its compiled-in user at start, whatever its config says.
if ! getent passwd Debian-exim >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin Debian-exim
fi

# bpffs: the agent mounts it itself, but tests read pins before any agent runs.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf
fi
