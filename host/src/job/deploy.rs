//! Writing an image and customizing what was written: `deploy` to a disk or file, `deploy
//! --target-format liveimg`, and Ganeti's `create` all go through here.

use super::write::{WriteRequest, Written};
use super::{announce_random_passwords, blocking, customize, JobError, VmSettings};
use crate::ops::Plan;
use crate::progress::Progress;
use crate::source::liveimg::{self, LiveimgError, TempPath};
use crate::source::Location;
use crate::vm::Interrupt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What `deploy` produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeployTarget {
    /// The image as a disk or filesystem (default).
    Raw,
    /// A customized liveimg (squashfs with the same compressor as the source).
    Liveimg,
}

/// Streams `request`'s image onto its target off the async runtime; an interrupt cancels it
/// (no partial output).
pub async fn write(
    request: &WriteRequest,
    progress: Arc<dyn Progress>,
    interrupt: &Interrupt,
) -> Result<Written, JobError> {
    let request = request.clone();
    cancellable("the writer", interrupt, move |cancel| super::write::write(&request, progress.as_ref(), cancel)).await
}

/// Runs the blocking `f` off the async runtime with a flag that an interrupt raises; `f` is
/// to stop and clean up when it sees it. `what` names `f` if it panics.
pub async fn cancellable<T: Send + 'static, E: Into<JobError> + Send + 'static>(
    what: &'static str,
    interrupt: &Interrupt,
    f: impl FnOnce(&AtomicBool) -> Result<T, E> + Send + 'static,
) -> Result<T, JobError> {
    let cancel = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (interrupt, flag) = (interrupt.clone(), cancel.clone());
        tokio::spawn(async move {
            crate::vm::interrupted(interrupt).await;
            flag.store(true, Ordering::Relaxed);
        })
    };
    let result = blocking(what, move || f(&cancel)).await;
    watcher.abort();
    result?.map_err(Into::into)
}

/// Customizes what `write` just wrote with `plan`: nothing to do for a disk and no
/// operations; a bare filesystem (from a liveimg) is always grown to its target's size.
pub async fn customize_written(
    written: &Written,
    request: &WriteRequest,
    plan: Plan,
    settings: &VmSettings,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Result<(), JobError> {
    if plan.is_empty() && !written.bare_filesystem {
        return Ok(());
    }
    customize(&request.target, plan, written.bare_filesystem, settings, progress, interrupt).await
}

/// Writes `request`'s image, then customizes it with `plan`.
pub async fn deploy(
    request: &WriteRequest,
    mut plan: Plan,
    settings: &VmSettings,
    progress: Arc<dyn Progress>,
    interrupt: &Interrupt,
) -> Result<(), JobError> {
    announce_random_passwords(&mut plan, progress.as_ref());
    let written = write(request, progress.clone(), interrupt).await?;
    customize_written(&written, request, plan, settings, progress.as_ref(), interrupt).await
}

/// liveimg → customized liveimg: the rootfs out to a temporary file beside the target,
/// customized there (grown first when `request.size` asks for room), repacked into the target.
pub async fn deploy_liveimg(
    request: &WriteRequest,
    mut plan: Plan,
    settings: &VmSettings,
    progress: Arc<dyn Progress>,
    interrupt: &Interrupt,
) -> Result<(), JobError> {
    announce_random_passwords(&mut plan, progress.as_ref());
    let source = match &request.image {
        Location::Path(p) => p.clone(),
        Location::Url(u) => return Err(LiveimgError::Remote(crate::source::http::redact(u)).into()),
    };
    liveimg::check_target(&request.target, request.force)?;
    let rootfs = TempPath(liveimg::temp_beside(&request.target, "rootfs"));
    let to_rootfs = WriteRequest { target: rootfs.0.clone(), force: false, ..request.clone() };
    let written = write(&to_rootfs, progress.clone(), interrupt).await?;
    if !written.bare_filesystem {
        return Err(LiveimgError::NotALiveimg { name: source, format: written.format.name() }.into());
    }
    customize(&rootfs.0, plan, request.size.is_some(), settings, progress.as_ref(), interrupt).await?;
    progress.status("repacking the liveimg");
    let target = request.target.clone();
    let rootfs_path = rootfs.0.clone();
    let spent = blocking("repack", move || liveimg::repack(&source, &rootfs_path, &target)).await??;
    tracing::info!(secs = spent.as_secs_f32(), "liveimg repacked");
    drop(rootfs);
    Ok(())
}
