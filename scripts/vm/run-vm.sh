#!/bin/bash
# usage: run-vm.sh KTREE 'command to run as root inside the VM'
#   KTREE: k61 | k612 | k510 (made by setup.sh under $KERNELS_DIR), or any dir with an
#          extracted Debian linux-image .deb (depmod -b already run)
# Boots that kernel in qemu (KVM if usable, else TCG) with the host's / as a read-only 9p root (+ RAM overlay),
# runs the command, powers off; exits with the command's exit status (255: no status came back,
# e.g. the guest did not boot or qemu was killed by VM_TIMEOUT). The serial console (kernel
# messages and the command's output) goes to stdout.
# The command travels on the kernel command line: at most ~2000 bytes, no double quotes, no host
# environment. For anything more, write a script into $VM_OUT and run `bash /mnt/out/script.sh`.
set -eu
S=$(dirname "$(realpath "$0")")
KDIR=${KERNELS_DIR:-$S/../../target/vm/kernels}
KTREE=$1; [ -d "$KTREE" ] || KTREE=$KDIR/$1
KTREE=$(realpath "$KTREE"); CMD=$2
KVER=$(ls "$KTREE/lib/modules")
INITRD=$KDIR/initrd-$KVER.cpio.gz
[ -f "$INITRD" ] || { mkdir -p "$KDIR"; "$S/mkinitrd.sh" "$KTREE" "$KVER" "$INITRD"; }
# /mnt/out in the guest is a read-write 9p share of $VM_OUT (kept) or of a temp dir (removed)
if [ -n "${VM_OUT:-}" ]; then mkdir -p "$VM_OUT"; OUT=$(realpath "$VM_OUT"); rm -f "$OUT/rc"
else mkdir -p "$KDIR"; OUT=$(mktemp -d "$KDIR/out.XXXXXX"); trap 'rm -rf "$OUT"' EXIT; fi
# KVM only where the CPU has real VMX/SVM: this host's /dev/kvm is PVM (kvm_pvm), which
# cannot run unmodified (non-PVM-guest) kernels, so fall back to TCG emulation there.
if [ -z "${VM_ACCEL:-}" ]; then
  if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then VM_ACCEL=kvm; else VM_ACCEL=tcg; fi
fi
if [ "$VM_ACCEL" = kvm ]; then ACCEL="-accel kvm -cpu ${VM_CPU:-host}"
else ACCEL="-accel tcg,thread=multi -cpu ${VM_CPU:-max}"; fi
# no_timer_check: on a loaded host the emulated guest is too slow for the kernel's IO-APIC timer
# check, which then panics at boot ("IO-APIC + timer doesn't work!"; seen with 6.1 under TCG).
# the command travels in the kernel command line as an env var of init: keep it simple
# (no double quotes); for anything longer, put it in a script and pass its absolute path.
timeout --foreground ${VM_TIMEOUT:-300} qemu-system-x86_64 \
  $ACCEL -smp ${VM_SMP:-2} -m ${VM_MEM:-2G} \
  -display none -vga none -serial stdio -monitor none -no-reboot -nic none \
  -kernel "$KTREE/boot/vmlinuz-$KVER" -initrd "$INITRD" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$OUT",mount_tag=out,security_model=none \
  -append "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off no_timer_check KVMCHECK_KTREE=$KTREE KVMCHECK_RUN=$S/guest-run.sh KVMCHECK_CMD=\"$CMD\"" \
  </dev/null || echo "run-vm: qemu exited with $? (124 = timeout)" >&2
rc=$(cat "$OUT/rc" 2>/dev/null || echo 255)
exit $rc
