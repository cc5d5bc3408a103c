//! The helper VM as both sides see it: the disks the host attaches and how the helper tells them
//! apart, the kernel command-line parameters the host sets for the helper, and the paths of the
//! helper image that the host builds and the helper runs from.

/// Serial number of the target disk (virtio), the disk being customized.
pub const TARGET_SERIAL: &str = "imgforge-target";
/// Serial number by which the helper finds the payload disk among its virtio disks.
pub const PAYLOAD_SERIAL: &str = "imgforge-payload";
/// Serial number of the raw, read-only bulk disk: large payload files at 4 KiB-aligned offsets
/// (`rules::Rules::bulk` says where each lies).
pub const BULK_SERIAL: &str = "imgforge-bulk";
/// The target disk's device in the helper: the host attaches it as the first virtio disk.
pub const TARGET_DISK: &str = "/dev/vda";
/// Serial number prefix of the guest's other disks: `imgforge-disk-2` is the second `-a`.
const DISK_SERIAL_PREFIX: &str = "imgforge-disk-";

/// Serial number of the guest's disk at `index` in the host's order (0: the target disk,
/// [`TARGET_SERIAL`]; 1: the second `-a`, `imgforge-disk-2`) (pure).
pub fn disk_serial(index: usize) -> String {
    if index == 0 {
        TARGET_SERIAL.to_owned()
    } else {
        format!("{DISK_SERIAL_PREFIX}{}", index + 1)
    }
}

/// The index in the host's order of the guest disk with `serial`, if it is one (pure).
pub fn disk_index(serial: &str) -> Option<usize> {
    if serial == TARGET_SERIAL {
        return Some(0);
    }
    let n: usize = serial.strip_prefix(DISK_SERIAL_PREFIX)?.parse().ok()?;
    (n >= 2 && serial == disk_serial(n - 1)).then(|| n - 1)
}

/// Where the host puts the task scripts in the helper image, and the helper runs them from.
pub const TASKS_DIR: &str = "/usr/lib/imgforge/tasks";
/// The module map in the helper image, `NAME [boot] PATH...` a line: a module, whether it loads
/// at boot, and the files to load for it, dependencies first (written by the host's
/// helper-image build, read by the helper).
pub const MODULE_MAP: &str = "/lib/modules/imgforge.modules";

/// Kernel command-line key of the modules the host expects the tasks to need (from the disk's
/// partition table and superblocks, parsed on the host): `imgforge.preload=a,b`.
pub const PRELOAD_PARAM: &str = "imgforge.preload=";

/// The kernel command-line parameter asking the helper to preload `modules` (pure).
pub fn preload_param(modules: &[&str]) -> String {
    format!("{PRELOAD_PARAM}{}", modules.join(","))
}

/// The module names of `imgforge.preload=a,b` in a kernel command line (pure).
pub fn preload_names(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(PRELOAD_PARAM))
        .flat_map(|list| list.split(','))
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_parameter() {
        let cases: &[(&str, &[&str])] = &[
            ("console=ttyS0 imgforge.preload=xfs,ext4 quiet", &["xfs", "ext4"]),
            ("imgforge.preload=squashfs imgforge.preload=dm_mod,", &["squashfs", "dm_mod"]),
            ("imgforge.preload= quiet", &[]),
            ("quiet", &[]),
        ];
        for (cmdline, want) in cases {
            assert_eq!(preload_names(cmdline), *want, "{cmdline}");
        }
    }

    #[test]
    fn disk_serials() {
        assert_eq!(disk_serial(0), TARGET_SERIAL);
        assert_eq!(disk_serial(1), "imgforge-disk-2");
        for i in [0, 1, 2, 15] {
            assert_eq!(disk_index(&disk_serial(i)), Some(i));
        }
        for other in [PAYLOAD_SERIAL, "imgforge-disk-1", "imgforge-disk-0", "imgforge-disk-02", "imgforge-disk-x", ""] {
            assert_eq!(disk_index(other), None, "{other}");
        }
    }

    /// What the host writes, the helper reads back.
    #[test]
    fn preload_parameter_round_trip() {
        let cases: &[&[&str]] = &[&["squashfs", "ext4", "dm_mod"], &["xfs"], &[]];
        for modules in cases {
            assert_eq!(preload_names(&format!("quiet {} panic=-1", preload_param(modules))), *modules);
        }
    }
}
