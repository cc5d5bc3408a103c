#!/usr/bin/env bash
# The main job on a built-in default, on a fresh Debian 12 machine (as root): installs what is
# needed, builds imgforge, makes a sample Debian disk image (debootstrap, cached) and customizes
# it in the helper VM, then shows the result read back with a read-only loop mount.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked

work=${IMGFORGE_DEMO_DIR:-/var/tmp/imgforge-demo}
mkdir -p "$work"
root="$work/rootfs"
if [ ! -e "$root/.complete" ]; then
    echo "== building a sample Debian 12 root (debootstrap, once)"
    rm -rf "$root"
    debootstrap --variant=minbase --include=tzdata bookworm "$root" http://deb.debian.org/debian >/dev/null
    touch "$root/.complete"
fi

img="$work/sample.img"
echo "== making $img (1 GiB raw, MBR, ext4 root)"
rm -f "$img"
truncate -s 1G "$img"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$img"
echo "UUID=5a3e0d1c-0000-4000-8000-0000000000d1 / ext4 errors=remount-ro 0 1" > "$root/etc/fstab"
mkfs.ext4 -q -F -L root -U 5a3e0d1c-0000-4000-8000-0000000000d1 -E offset=1048576 -d "$root" "$img" 1047552k

key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyOfImgforge00000000000000000000000 demo@imgforge"
echo "== imgforge customize (helper VM; KVM where it works, TCG otherwise)"
time ./target/release/imgforge customize -a "$img" \
    --hostname demo.example.com \
    --root-password password:demo \
    --ssh-inject "root:string:$key" \
    --timezone Europe/Athens \
    --write /etc/motd:"" --append-line /etc/motd:"Customized by imgforge" \
    --run-command 'echo "built on $(cat /etc/debian_version)" >> /etc/motd'

echo "== reading the result back (read-only loop mount)"
mnt=$(mktemp -d)
mount -o ro,loop,offset=1048576,noload "$img" "$mnt"
trap 'umount "$mnt"; rmdir "$mnt"' EXIT
echo "/etc/hostname:        $(cat "$mnt/etc/hostname")"
echo "/etc/motd:            $(tr '\n' '|' < "$mnt/etc/motd")"
echo "/etc/localtime ->     $(readlink "$mnt/etc/localtime")"
echo "root's shadow field:  $(grep '^root:' "$mnt/etc/shadow" | cut -d: -f2 | cut -c1-20)..."
echo "authorized_keys:      $(stat -c '%a %U' "$mnt/root/.ssh/authorized_keys") $(cut -c1-40 "$mnt/root/.ssh/authorized_keys")..."
