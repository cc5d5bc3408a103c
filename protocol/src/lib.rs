//! The only contract between the imgforge host and the helper VM.
//!
//! Nothing here does I/O of its own (the capped line reader reads the caller's `BufRead`): the
//! host writes [`rules::Rules`] to the parameter floppy and reads
//! [`report::ReportLine`]s from the helper's second serial port; the helper does the reverse.
//! Both recognize filesystems by their superblocks the same way ([`filesystems`]), and name the
//! helper VM's disks and paths the same way ([`helper_vm`]).

// Product code never unwraps: a panic in PID 1 or mid-write is the worst error report.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bytes;
pub mod change;
pub mod digest_cache;
pub mod filesystems;
pub mod helper_vm;
pub mod line;
pub mod manifest;
pub mod perl_edit;
pub mod printable;
pub mod report;
pub mod rules;
pub mod task;

#[cfg(test)]
mod render_reference_tests;

/// Name of the rules document on the parameter floppy.
pub const RULES_FILE_NAME: &str = "rules.json";
/// Volume label of the parameter floppy.
pub const FLOPPY_LABEL: &str = "IMGFORGE";
