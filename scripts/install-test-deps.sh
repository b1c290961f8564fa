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
  systemd            # systemd-analyze verify / systemd-sysusers on the shipped unit (ops tests)
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

# bpffs: the agent mounts it itself, but tests read pins before any agent runs.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf bpf /sys/fs/bpf
fi
