//! Exit statuses of the command line (cli.md) and the error that carries one.

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

impl Failure {
    /// The failure for a helper VM that did not report, with `message`.
    fn from_vm(e: &crate::vm::VmError, message: String) -> Self {
        use crate::vm::VmError as E;
        let status = match e {
            E::Timeout { .. } => ExitStatus::Timeout,
            E::Interrupted(_) => ExitStatus::Interrupted,
            E::NoReport { .. } => ExitStatus::CustomizationFailed,
            E::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ExitStatus::BadInput,
            _ => ExitStatus::Environment,
        };
        Self::new(status, message)
    }
}

impl From<crate::vm::VmError> for Failure {
    fn from(e: crate::vm::VmError) -> Self {
        let message = e.to_string();
        Self::from_vm(&e, message)
    }
}

impl From<crate::job::JobError> for Failure {
    fn from(e: crate::job::JobError) -> Self {
        use crate::floppy::FloppyError;
        use crate::job::JobError as E;
        use crate::payload::PayloadError;
        let status = match &e {
            E::Step(failure) => failure.status,
            E::Vm(vm) => return Failure::from_vm(vm, e.to_string()),
            E::Target(_) | E::HelperUser(_) => ExitStatus::BadInput,
            E::Floppy(FloppyError::TooLarge(_)) | E::Payload(PayloadError::Source { .. }) => ExitStatus::BadInput,
            E::TaskFailed { .. } => ExitStatus::CustomizationFailed,
            E::HelperImage(_) | E::WorkDir { .. } | E::Floppy(_) | E::Payload(_) | E::Overlay(_) | E::Panicked(..) => {
                ExitStatus::Environment
            }
        };
        Self::new(status, e.to_string())
    }
}

impl From<crate::ops::OpsError> for Failure {
    fn from(e: crate::ops::OpsError) -> Self {
        Self::bad_input(e.to_string())
    }
}

impl From<crate::helper_image::BuildError> for Failure {
    fn from(e: crate::helper_image::BuildError) -> Self {
        crate::job::JobError::from(e).into()
    }
}
