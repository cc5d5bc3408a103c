# Sourced by cluster.sh and bench.sh, inside their own namespaces: a single-node Ganeti cluster
# (fake hypervisor, file and blockdev disks) with a private hostname, /etc/hosts, an address of
# the documentation range on the namespace's loopback, and all Ganeti state on tmpfs.
hostname node1.imgforge.test
ip link set lo up
ip addr add 192.0.2.10/32 dev lo
mount --make-rprivate /
mount -t sysfs sysfs /sys
for d in /var/lib/ganeti /var/log/ganeti /run/ganeti /srv/ganeti /var/run/ganeti; do mkdir -p $d; mount -t tmpfs tmpfs $d; done
saved=$(mktemp -d)
cp -a /etc/ganeti/. "$saved"/ 2>/dev/null || true
mount -t tmpfs tmpfs /etc/ganeti
cp -a "$saved"/. /etc/ganeti/ 2>/dev/null || true
hosts=$(mktemp)
printf '127.0.0.1 localhost\n192.0.2.10 node1.imgforge.test node1\n192.0.2.20 cluster.imgforge.test cluster\n192.0.2.30 inst1.imgforge.test inst1\n192.0.2.31 inst2.imgforge.test inst2\n192.0.2.32 inst3.imgforge.test inst3\n' > "$hosts"
chmod 644 "$hosts"
mount --bind "$hosts" /etc/hosts
ip link add gntbr0 type bridge; ip link set gntbr0 up
mkdir -p /srv/ganeti/file-storage /srv/ganeti/os
echo /srv/ganeti/file-storage > /etc/ganeti/file-storage-paths
mkdir -p /root/.ssh
gnt-cluster init --enabled-hypervisors=fake --enabled-disk-templates=file,blockdev --master-netdev=lo --no-etc-hosts --no-ssh-init --file-storage-dir=/srv/ganeti/file-storage --nic-parameters=link=gntbr0 cluster.imgforge.test
echo INIT-OK
gnt-cluster modify --ipolicy-bounds-specs min:disk-size=128,cpu-count=1,disk-count=1,memory-size=64,nic-count=1,spindle-use=1/max:disk-size=1048576,cpu-count=8,disk-count=16,memory-size=65536,nic-count=8,spindle-use=12
