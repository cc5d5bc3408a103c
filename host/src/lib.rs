//! imgforge: customizes operating-system images offline, in an unprivileged helper VM.
//!
//! The host side: checks the user's operations, builds the rules floppy and payload disk,
//! keeps the helper image (kernel + initramfs) built, runs the confined helper VM and turns
//! its report into an exit status.

pub mod argv;
pub mod cli;
pub mod commands_file;
pub mod decompress;
pub mod exit;
pub mod floppy;
pub mod ganeti;
pub mod helper_image;
pub mod inspect;
pub mod job;
pub mod liveimg;
pub mod nbd;
pub mod ops;
pub mod overlay;
pub mod password;
pub mod payload;
pub mod progress;
pub mod qcow2;
pub mod qemu_source;
pub mod source;
pub mod squashfs;
pub mod stream;
pub mod target;
pub mod verify;
pub mod vm;
pub mod write;
