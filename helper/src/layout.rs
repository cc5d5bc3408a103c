//! Where things are inside the helper VM, for PID 1, the task runner and the built-in tasks
//! alike. The paths the host names too (the tasks, the module map, the target disk) are in
//! `imgforge_protocol::helper_vm`.

/// Scratch state shared by the tasks of one run.
pub const STATE_DIR: &str = "/run/imgforge";
/// Where the rules read from the floppy are kept for the tasks.
pub const RULES_PATH: &str = "/run/imgforge/rules.json";
/// Where 10-MountRoot mounts the guest's root filesystem.
pub const TARGET_DIR: &str = "/mnt/guest";
/// Where 05-MountPayload mounts the payload disk.
pub const PAYLOAD_DIR: &str = "/mnt/payload";
/// The command search path of tasks, and of the helper itself.
pub const SEARCH_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
