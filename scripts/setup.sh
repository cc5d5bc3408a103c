#!/usr/bin/env bash
# Installs what imgforge, its helper image and its tests need on Debian 12, as root.
# Idempotent: does nothing when everything is already in place.
set -euo pipefail

# qemu-system-x86 and libguestfs want Debian 12's qemu 7.2; some machines ship a backported
# qemu-utils 10 (or a whole backported qemu): install one consistent set, every qemu package
# from bookworm (hence the /bookworm suffixes and --allow-downgrades).
QEMU_SET=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils qemu-block-extra)
PACKAGES=(
    "${QEMU_SET[@]}"  # the helper VM, qemu-img
    busybox-static util-linux e2fsprogs xfsprogs btrfs-progs lvm2 gdisk fdisk squashfs-tools  # helper image tools
    kmod dpkg cpio  # helper image build (depmod, dpkg-deb)
    debootstrap dosfstools zstd xz-utils gzip rpm createrepo-c  # test fixtures (rpm: rpmbuild)
    ganeti iproute2 bc  # the single-node Ganeti cluster test
    dpkg-dev binutils lintian man-db  # scripts/package.sh (dpkg-shlibdeps, strip) and its test (man -w)
    policycoreutils  # setfiles, copied into an SELinux test guest (tests/tests/selinux.rs)
    libguestfs-tools  # virt-customize, for the differential test (Debian 12's: pulls no other qemu)
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# The major version a qemu program prints first ("qemu-img version 7.2.22", "qemu-nbd 7.2.22").
qemu_major() { "$1" --version 2>/dev/null | head -n1 | sed -n 's/^[^0-9]*\([0-9][0-9]*\)\..*/\1/p'; }
# The versions of the qemu programs imgforge runs, one line ("qemu-img 7 qemu-nbd 7 ...").
qemu_versions() { for q in qemu-img qemu-nbd qemu-system-x86_64; do printf '%s %s ' "$q" "$(qemu_major "$q")"; done; }
# All three present, all of one major version.
qemu_consistent() {
    local img nbd system
    img=$(qemu_major qemu-img) nbd=$(qemu_major qemu-nbd) system=$(qemu_major qemu-system-x86_64)
    [ -n "$img" ] && [ "$img" = "$nbd" ] && [ "$img" = "$system" ]
}
if [ "${#missing[@]}" -eq 0 ] && qemu_consistent; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages (${missing[*]:-qemu set}); run this as root" >&2
    exit 4
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends --allow-downgrades \
    "${PACKAGES[@]:${#QEMU_SET[@]}}" $(printf '%s/bookworm ' "${QEMU_SET[@]}")
if ! qemu_consistent; then
    echo "setup: the qemu programs still differ in version after installing Debian 12's set ($(qemu_versions)):" \
        "remove the other qemu packages (dpkg -l 'qemu*') and run this again" >&2
    exit 4
fi
echo "setup: $(qemu_versions)"
