#!/bin/bash
# PID 1 inside the VM after switch_root (the host's root fs, read-only, under a RAM overlay).
# Runs $KVMCHECK_CMD (from the kernel command line), writes its exit status to /mnt/out/rc.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /sys/fs/cgroup 2>/dev/null; mkdir -p /sys/fs/cgroup/unified
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified     # same path as on the host (hybrid layout there)
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up
hostname tarpit-vm                                  # else "(none)": Postfix's delivery agents refuse it
ulimit -n 65536 2>/dev/null || true                 # the kernel's default for PID 1 is 1024
echo "guest: kernel $(uname -r), $(nproc) cpus, up $(cut -d' ' -f1 /proc/uptime)s"
cd /tmp
rc=0
bash -c "$KVMCHECK_CMD" || rc=$?
echo "guest: KVMCHECK_RC=$rc  up $(cut -d' ' -f1 /proc/uptime)s"
echo $rc > /mnt/out/rc
sync
echo o > /proc/sysrq-trigger
sleep 5; echo b > /proc/sysrq-trigger
