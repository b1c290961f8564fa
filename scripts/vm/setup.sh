#!/bin/bash
# usage: setup.sh [k61] [k612] [k510]     (default: k61 k612)
#
# Makes the Debian kernels that `cargo xtask test --kernel ...` boots in qemu ready,
# idempotently: installs the host tools when missing (qemu, busybox-static, cpio, kmod...),
# then for each kernel that is not ready yet downloads the newest Debian linux-image package,
# extracts it (dpkg-deb -x, never installed), runs depmod and builds a small initramfs.
#   k61  Debian 12 (bookworm) 6.1          linux-image-amd64 from the system's apt sources
#   k612 Debian 12 6.12 ("+deb12")         linux-image-6.12-amd64 from the same sources
#   k510 Debian 11 (bullseye) 5.10         via a private apt source list; the system's apt
#                                          configuration is never touched
# Everything lives in $KERNELS_DIR (default: target/vm/kernels of this repository): ~300 MB per kernel. A kernel
# counts as ready when $KERNELS_DIR/<name>/.ready exists; remove that file (or the dir) to
# download the newest package again. Set VM_SETUP_NO_APT=1 to refuse installing host tools.
set -eu
S=$(dirname "$(realpath "$0")")
KDIR=${KERNELS_DIR:-$S/../../target/vm/kernels}
mkdir -p "$KDIR"; cd "$KDIR"
export DEBIAN_FRONTEND=noninteractive
wanted=${*:-k61 k612}

todo=""
for k in $wanted; do
  case $k in k61|k612|k510) ;; *) echo "setup.sh: unknown kernel '$k' (k61, k612, k510)" >&2; exit 2;; esac
  kver=$(ls "$k/lib/modules" 2>/dev/null | head -1 || true)
  if [ -f "$k/.ready" ] && [ -n "$kver" ] && [ -f "initrd-$kver.cpio.gz" ]; then
    echo "$k: ready ($(cat "$k/.ready"))"
  else
    todo="$todo $k"
  fi
done
[ -z "$todo" ] && exit 0

# Host tools: installed only when one is missing (one apt-get update).
need=""
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || need="$need busybox-static"
command -v cpio >/dev/null || need="$need cpio"
command -v depmod >/dev/null || need="$need kmod"
command -v xz >/dev/null || need="$need xz-utils"
command -v zstd >/dev/null || need="$need zstd"
command -v ip >/dev/null || need="$need iproute2"
command -v bpftool >/dev/null || need="$need bpftool"
updated=0
if [ -n "$need" ]; then
  if [ "${VM_SETUP_NO_APT:-0}" = 1 ]; then echo "setup.sh: missing host tools:$need" >&2; exit 1; fi
  echo "setup.sh: installing host tools:$need"
  apt-get update -qq; updated=1
  apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

B="-o Dir::Etc::sourcelist=$KDIR/apt-bullseye/sources.list -o Dir::Etc::sourceparts=-
   -o Dir::State::Lists=$KDIR/apt-bullseye/lists -o Dir::Cache=$KDIR/apt-bullseye/cache"
mkdir -p debs
for k in $todo; do
  case $k in
    k61)  meta=linux-image-amd64; opts="" ;;
    k612) meta=linux-image-6.12-amd64; opts="" ;;
    k510) meta=linux-image-amd64; opts=$B
          mkdir -p apt-bullseye/lists/partial apt-bullseye/cache
          # the same Debian mirror the system already uses, with the bullseye suites
          mirror=$(grep -rhoE '^(URIs:|deb) +[a-z]+://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
                   | awk '{print $2}' | grep -E '/debian/?$' | head -1)
          [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
          mirror=${mirror%/}
          printf '%s\n' "deb $mirror bullseye main" "deb ${mirror}-security bullseye-security main" \
            > apt-bullseye/sources.list
          apt-get $B update -qq ;;
  esac
  if [ -z "$opts" ] && [ $updated = 0 ]; then apt-get update -qq; updated=1; fi
  # the ABI-numbered package (linux-image-6.1.0-NN-amd64 ...) changes with every update: resolve it
  pkg=$(apt-cache $opts depends "$meta" | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$pkg" ] || { echo "setup.sh: cannot resolve $meta for $k" >&2; exit 1; }
  rm -f debs/*.deb
  (cd debs && apt-get $opts -o APT::Sandbox::User=root download -qq "$pkg")
  old=$(ls "$k/lib/modules" 2>/dev/null | head -1 || true); [ -z "$old" ] || rm -f "initrd-$old.cpio.gz"
  rm -rf "$k"; dpkg-deb -x debs/${pkg}_*.deb "$k"; rm -rf "$k/usr/share/doc"
  kver=$(ls "$k/lib/modules"); depmod -b "$k" "$kver"      # the .deb ships no modules.dep
  rm -f initrd-$kver.cpio.gz; "$S/mkinitrd.sh" "$k" "$kver" initrd-$kver.cpio.gz
  echo "$pkg $kver" > "$k/.ready"
  echo "$k: $pkg ($kver)"
done
rm -rf debs apt-bullseye/lists apt-bullseye/cache     # .debs and index files are not needed any more
