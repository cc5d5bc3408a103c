//! Exit statuses of the command line (the CLI contract, shared/docs/cli.md) and the error that
//! carries one. The library's typed errors are mapped to a status here, and only here.

use crate::job::write::WriteError;
use crate::job::JobError;
use crate::stream::destination::DestinationError;
use crate::stream::StreamError;
use crate::vm::VmError;
use thiserror::Error;

/// What the process exit code means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Everything worked.
    Success = 0,
    /// The customization failed inside the helper (a task failed).
    CustomizationFailed = 1,
    /// Bad usage or bad input.
    BadInput = 2,
    /// The helper VM timed out.
    Timeout = 3,
    /// qemu missing, no space, permissions, a broken environment.
    Environment = 4,
    /// Stopped by SIGINT/SIGTERM.
    Interrupted = 130,
}

/// An error on its way to the user, with the exit status it ends in.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct Failure {
    /// Exit status.
    pub status: ExitStatus,
    /// The whole message (what failed, on what, what to do).
    pub message: String,
}

impl Failure {
    /// A failure with this status and message.
    pub fn new(status: ExitStatus, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    /// Bad input (exit 2).
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(ExitStatus::BadInput, message)
    }

    /// Environment problem (exit 4).
    pub fn environment(message: impl Into<String>) -> Self {
        Self::new(ExitStatus::Environment, message)
    }
}

/// How an image qemu could not open for imgforge ends.
fn qemu_source_status(e: &crate::source::qemu::QemuSourceError) -> ExitStatus {
    match e {
        crate::source::qemu::QemuSourceError::Image(_) => ExitStatus::BadInput,
        crate::source::qemu::QemuSourceError::Confinement { .. } => ExitStatus::Environment,
    }
}

/// How a write that did not complete ends.
fn write_status(e: &WriteError) -> ExitStatus {
    use WriteError as E;
    match e {
        E::Qemu(qemu) => qemu_source_status(qemu),
        E::Destination(DestinationError::Open { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied || source.raw_os_error() == Some(libc::ENOSPC) =>
        {
            ExitStatus::Environment
        }
        E::Stream(stream) if matches!(stream.cause(), StreamError::Cancelled) => ExitStatus::Interrupted,
        E::Stream(stream) if matches!(stream.cause(), StreamError::Write { .. }) => ExitStatus::Environment,
        E::Download { .. } => ExitStatus::Environment,
        E::Source(_) | E::Destination(_) | E::Stream(_) | E::Corrupt { .. } | E::Sha256Mismatch { .. } => {
            ExitStatus::BadInput
        }
    }
}

/// How a helper VM that did not report ends.
fn vm_status(e: &VmError) -> ExitStatus {
    use VmError as E;
    match e {
        E::Timeout { .. } => ExitStatus::Timeout,
        E::Interrupted(_) => ExitStatus::Interrupted,
        E::NoReport { .. } => ExitStatus::CustomizationFailed,
        E::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ExitStatus::BadInput,
        _ => ExitStatus::Environment,
    }
}

/// How a job that did not reach its end ends.
fn job_status(e: &JobError) -> ExitStatus {
    use crate::job::floppy::FloppyError;
    use crate::job::payload::PayloadError;
    use JobError as E;
    match e.cause() {
        E::Write(write) => write_status(write),
        E::Liveimg(crate::source::liveimg::LiveimgError::Repack { .. }) => ExitStatus::Environment,
        E::Liveimg(_) => ExitStatus::BadInput,
        E::Vm(vm) => vm_status(vm),
        E::HelperUser(crate::vm::privilege::PrivilegeError::Dynamic(_)) => ExitStatus::Environment,
        E::Target(_)
        | E::HelperUser(_)
        | E::SameDisk { .. }
        | E::Overlay(crate::job::overlay::OverlayError::Refused { .. }) => ExitStatus::BadInput,
        E::Floppy(FloppyError::TooLarge(_))
        | E::Payload(PayloadError::Source { .. } | PayloadError::Changed { .. }) => ExitStatus::BadInput,
        E::TaskFailed { .. } | E::Variant { .. } => ExitStatus::CustomizationFailed,
        E::HelperImage(_)
        | E::WorkDir { .. }
        | E::Floppy(_)
        | E::Payload(_)
        | E::Overlay(_)
        | E::Panicked(..)
        | E::Publish { .. }
        | E::PartlyCommitted { .. }
        | E::StartZeroed { .. } => ExitStatus::Environment,
    }
}

/// `From` impls that give each typed error its exit status, keeping its message.
macro_rules! exit_status_of {
    ($($error:ty => $status:expr),* $(,)?) => {$(
        impl From<$error> for Failure {
            fn from(e: $error) -> Self {
                Self::new($status(&e), e.to_string())
            }
        }
    )*};
}

/// How a verification that could not run ends (a bad image is a report, and exit 1).
fn verify_status(e: &crate::job::verify::VerifyError) -> ExitStatus {
    use crate::job::verify::VerifyError as E;
    match e {
        E::PackageName(_) | E::Source(_) => ExitStatus::BadInput,
        E::Job(job) => job_status(job),
    }
}

/// How a Ganeti OS action that failed ends.
fn ganeti_status(e: &crate::ganeti::GanetiError) -> ExitStatus {
    use crate::ganeti::GanetiError as E;
    match e {
        E::Write(write) => write_status(write),
        E::Job(job) => job_status(job),
        E::Unset(_)
        | E::Config(_)
        | E::Param(_)
        | E::OutsideImageDir { .. }
        | E::NoSuchImage { .. }
        | E::OpenDisk { .. }
        | E::Ops(_)
        | E::Variant(_)
        | E::Fetch(_)
        | E::Sha256File { .. } => ExitStatus::BadInput,
        E::ConfigRead { .. }
        | E::ImageDir { .. }
        | E::Stage { .. }
        | E::Monitor { .. }
        | E::WorkDir(_)
        | E::Install { .. }
        | E::Export { .. } => ExitStatus::Environment,
    }
}

/// How an inspection that could not finish ends.
fn inspect_status(e: &crate::inspect::InspectError) -> ExitStatus {
    use crate::inspect::InspectError as E;
    match e {
        E::Qemu(qemu) => qemu_source_status(qemu),
        E::Source(_) | E::Corrupt { .. } => ExitStatus::BadInput,
        E::Interrupted(_) => ExitStatus::Interrupted,
    }
}

/// How a build that did not produce every variant ends: as its first failed variant would.
fn build_status(e: &crate::recipe::build::BuildError) -> ExitStatus {
    use crate::recipe::build::BuildError as E;
    match e {
        E::Read { .. }
        | E::Recipe(_)
        | E::SourceDateEpoch(_)
        | E::BaseMismatch { .. }
        | E::BaseNotAFile { .. }
        | E::OutputExists(_) => ExitStatus::BadInput,
        E::Io { .. } => ExitStatus::Environment,
        E::Job(job) => job_status(job),
        E::Variants { failed, .. } => failed.first().map_or(ExitStatus::CustomizationFailed, |(_, e)| job_status(e)),
    }
}

exit_status_of! {
    crate::recipe::build::BuildError => build_status,
    crate::inspect::InspectError => inspect_status,
    crate::ganeti::GanetiError => ganeti_status,
    WriteError => write_status,
    VmError => vm_status,
    JobError => job_status,
    crate::job::verify::VerifyError => verify_status,
}

/// Errors that are a step of a write: they end as the write would.
macro_rules! as_write_error {
    ($($error:ty),*) => {$(
        impl From<$error> for Failure {
            fn from(e: $error) -> Self {
                WriteError::from(e).into()
            }
        }
    )*};
}

as_write_error!(crate::source::SourceError, DestinationError, StreamError);

impl From<crate::ops::OpsError> for Failure {
    fn from(e: crate::ops::OpsError) -> Self {
        Self::bad_input(e.to_string())
    }
}

impl From<crate::helper_image::BuildError> for Failure {
    fn from(e: crate::helper_image::BuildError) -> Self {
        JobError::from(e).into()
    }
}
