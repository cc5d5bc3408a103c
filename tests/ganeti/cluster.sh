#!/bin/sh
# A single-node Ganeti cluster (fake hypervisor, file disks) in namespaces of its own: private
# hostname, private /etc/hosts, a documentation-range address on the namespace's loopback, all
# Ganeti state on tmpfs. Run as:
#   unshare --net --uts --mount --pid --fork --mount-proc cluster.sh IMGFORGE IMAGE_DIR OUT KEY [DEB]
# The disks and OS logs it produces are copied to OUT for the test to read back.
# With DEB (imgforge's package), the OS definition and /usr/bin/imgforge are the package's
# (unpacked with dpkg-deb -x, /usr/bin overlaid for this namespace only): gnt-os diagnose
# must find the OS valid and an instance with img_id=null be added; nothing else runs.
set -eu
IMGFORGE=$1
IMAGES=$2
OUT=$3
KEY=$4
DEB=${5:-}
. "$(dirname "$0")/cluster-init.sh"
if [ -n "$DEB" ]; then
    mkdir /srv/ganeti/deb /srv/ganeti/bin /srv/ganeti/bin-work
    dpkg-deb -x "$DEB" /srv/ganeti/deb
    cp -a /srv/ganeti/deb/srv/ganeti/os/imgforge /srv/ganeti/os/
    cp -a /srv/ganeti/deb/usr/bin/imgforge /srv/ganeti/bin/
    mount -t overlay overlay -o lowerdir=/usr/bin,upperdir=/srv/ganeti/bin,workdir=/srv/ganeti/bin-work /usr/bin
else
    "$IMGFORGE" ganeti install-os --os-dir /srv/ganeti/os
fi
mount -t tmpfs tmpfs /etc/default
printf 'IMAGE_DIR=%s\nACCEL=tcg\nHELPER_SOFT_TIMEOUT=300\n' "$IMAGES" > /etc/default/imgforge
add() { gnt-instance add -t file --disk 0:size=2048 -B memory=128 -o imgforge+default --no-start --no-ip-check --no-name-check -n node1.imgforge.test "$@"; }
copy_disk() { cp --sparse=always "$(ls -t /srv/ganeti/file-storage/*/*.disk0 | head -n 1)" "$OUT/$1"; }

if [ -n "$DEB" ]; then
    gnt-os diagnose || echo "DIAGNOSE-FAILED $?"
    gnt-os info imgforge
    add -O img_id=null inst1.imgforge.test
    echo PACKAGED-ADD-OK
    cp -r /var/log/ganeti/os "$OUT/os-log"
    echo CLUSTER-DONE
    exit 0
fi

started=$(date +%s%N)
# Commas inside a value are escaped for gnt-instance's -O parser.
PERSONALITY='[{"path": "/etc/imgforge-personality"\,"contents": "cGVyc29uYWxpdHkK"}]'
add -O "img_id=debian,img_passwd=Cluster-Pw-1,auth_keys=$KEY,img_personality=$PERSONALITY" inst1.imgforge.test
echo "ADD-MS $(( ($(date +%s%N) - started) / 1000000 ))"
copy_disk create.disk0

gnt-instance reinstall -f -O "img_id=debian,img_passwd=Reinstall-Pw-2" inst1.imgforge.test
copy_disk reinstall.disk0


# Name check on (the names resolve in the private /etc/hosts): without it gnt-instance rename
# asks for confirmation on a terminal.
gnt-instance rename --no-ip-check inst1.imgforge.test inst2.imgforge.test
copy_disk rename.disk0

gnt-backup export -n node1.imgforge.test inst2.imgforge.test
gnt-backup import -t file --disk 0:size=2048 -B memory=128 -n node1.imgforge.test --src-node=node1.imgforge.test \
    --src-dir=/var/lib/ganeti/export/inst2.imgforge.test --no-ip-check --net 0:mac=generate inst3.imgforge.test
copy_disk import.disk0

if add -O 'img_id=debian,img_properties={bad json' inst9.imgforge.test; then echo BAD-PROPERTIES-ACCEPTED; else echo BAD-PROPERTIES-REJECTED; fi

cp -r /var/log/ganeti/os "$OUT/os-log"
echo CLUSTER-DONE
