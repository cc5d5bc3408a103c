//! imgforge: customizes operating-system images offline, in an unprivileged helper VM.
//!
//! Layered, top to bottom: `cli` (clap, exit statuses; the only place that knows about exit
//! codes) and `ganeti` (the OS interface) call `job`, the one pipeline every command goes
//! through (write the image, prepare the helper run, run it, commit or discard). Below it:
//! `source` (format detection, decoders, confined qemu for qemu formats), `stream` (the
//! direct-I/O writer), `ops` (the virt-customize grammar into rules), `vm` (qemu, QMP,
//! timeouts, the accelerator), `helper_image` (kernel + initramfs), `inspect`, `progress`.

// Product code never unwraps: a panic in PID 1 or mid-write is the worst error report.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cancel;
pub mod cli;
pub mod file_digest;
pub mod ganeti;
pub mod helper_image;
pub mod inspect;
pub mod job;
pub mod ops;
pub mod plain_number;
pub mod progress;
pub mod recipe;
pub mod source;
pub mod stdio;
pub mod stream;
pub mod vm;
pub mod workdir;
