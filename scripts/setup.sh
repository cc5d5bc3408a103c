#!/usr/bin/env bash
# Installs what imgforge, its helper image and its tests need on Debian 12, as root.
# Idempotent: does nothing when everything is already in place.
set -euo pipefail

# qemu-system-x86 and libguestfs want Debian 12's qemu 7.2; some machines ship a backported
# qemu-utils 10: install one consistent set (hence qemu-utils/bookworm and --allow-downgrades).
PACKAGES=(
    qemu-system-x86 qemu-utils qemu-block-extra  # the helper VM, qemu-img
    busybox-static util-linux e2fsprogs xfsprogs lvm2 gdisk fdisk squashfs-tools  # helper image tools
    kmod dpkg cpio  # helper image build (depmod, dpkg-deb)
    debootstrap dosfstools zstd xz-utils gzip rpm createrepo-c  # test fixtures (rpm: rpmbuild)
    ganeti iproute2 bc  # the single-node Ganeti cluster test
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
qemu_major() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1; }
if [ "${#missing[@]}" -eq 0 ] && [ "$(qemu_major qemu-img)" = "$(qemu_major qemu-system-x86_64)" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages (${missing[*]:-qemu set}); run this as root" >&2
    exit 4
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends --allow-downgrades \
    $(printf "%s\n" "${PACKAGES[@]}" | sed "s/^qemu-utils$/qemu-utils\/bookworm/; s/^qemu-block-extra$/qemu-block-extra\/bookworm/")
