#!/bin/sh
# `gnt-instance add` timed on a single-node Ganeti cluster (cluster-init.sh) with two OS
# definitions side by side: `imgforge` (NEW) and `imgforgeold` (OLD, another build). Run as:
#   unshare --net --uts --mount --pid --fork --mount-proc bench.sh NEW OLD IMAGE_DIR IMAGE DISKS RUNS
# IMAGE is an image name in IMAGE_DIR; the instance disk is 8 GiB; DISKS is a host directory
# (not tmpfs: each instance writes the image's data) the file disks are made in. One warm-up add
# each (it builds that build's helper image), then RUNS alternating pairs; each add prints
#   ADD <os> <run> <ms> <end of the last partition in bytes> <load average>
# and the instance is removed before the next.
set -eu
NEW=$1
OLD=$2
IMAGES=$3
IMAGE=$4
DISKS=$5
RUNS=$6
. "$(dirname "$0")/cluster-init.sh"
mount --bind "$DISKS" /srv/ganeti/file-storage
"$NEW" ganeti install-os --os-dir /srv/ganeti/os >/dev/null
old_dir=$(mktemp -d)
"$OLD" ganeti install-os --os-dir "$old_dir" >/dev/null
mv "$old_dir/imgforge" /srv/ganeti/os/imgforgeold
mount -t tmpfs tmpfs /etc/default
printf 'IMAGE_DIR=%s\nACCEL=tcg\nHELPER_SOFT_TIMEOUT=900\n' "$IMAGES" > /etc/default/imgforge

n=0
add() {
    os=$1
    run=$2
    n=$((n + 1))
    name=inst$((n % 3 + 1)).imgforge.test
    started=$(date +%s%N)
    gnt-instance add -t file --disk 0:size=8192 -B memory=128 -o "$os+default" --no-start --no-ip-check \
        --no-name-check -n node1.imgforge.test -O "img_id=$IMAGE,img_passwd=Bench-Pw-1" "$name" >/dev/null
    ms=$(( ($(date +%s%N) - started) / 1000000 ))
    disk=$(ls /srv/ganeti/file-storage/*/*.disk0)
    end=$(sfdisk -d "$disk" | awk -F'[=,]' '/start=/ { if ($2 + $4 > e) e = $2 + $4 } END { print e * 512 }')
    echo "ADD $os $run $ms $end $(cut -d' ' -f1-3 /proc/loadavg)"
    gnt-instance remove -f "$name" >/dev/null
}
add imgforgeold warm
add imgforge warm
i=0
while [ "$i" -lt "$RUNS" ]; do
    # Alternate which goes first, so a load that drifts favours neither.
    if [ $((i % 2)) -eq 0 ]; then add imgforgeold "$i"; add imgforge "$i"; else add imgforge "$i"; add imgforgeold "$i"; fi
    i=$((i + 1))
done
echo BENCH-DONE
