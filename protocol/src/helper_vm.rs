//! The helper VM as both sides see it: the disks the host attaches and how the helper tells them
//! apart, and the paths of the helper image that the host builds and the helper runs from.

/// Serial number of the target disk (virtio), the disk being customized.
pub const TARGET_SERIAL: &str = "imgforge-target";
/// Serial number by which the helper finds the payload disk among its virtio disks.
pub const PAYLOAD_SERIAL: &str = "imgforge-payload";
/// The target disk's device in the helper: the host attaches it as the first virtio disk.
pub const TARGET_DISK: &str = "/dev/vda";

/// Where the host puts the task scripts in the helper image, and the helper runs them from.
pub const TASKS_DIR: &str = "/usr/lib/imgforge/tasks";
/// The module map in the helper image, `NAME [boot] PATH...` a line: a module, whether it loads
/// at boot, and the files to load for it, dependencies first (written by the host's
/// helper-image build, read by the helper).
pub const MODULE_MAP: &str = "/lib/modules/imgforge.modules";
