//! Writing an image and customizing what was written: `deploy` to a disk or file, `deploy
//! --target-format liveimg`, and Ganeti's `create` all go through here.

use super::write::{WriteRequest, Written};
use super::{announce_random_passwords, blocking, customize, GuestDisk, JobError, KnownFormat, VmSettings};
use crate::ops::Plan;
use crate::progress::Progress;
use crate::source::liveimg::{self, LiveimgError, TempPath};
use crate::source::Location;
use crate::stream::destination::publish;
use crate::stream::held_start::zero_start;
use crate::vm::Interrupt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What `write` leaves on its target.
const RAW: KnownFormat = KnownFormat::Given(crate::vm::cmdline::DiskFormat::Raw);

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

/// Customizes what `write` just wrote with `plan`: nothing to do for a disk no larger than
/// the image and no operations; a bare filesystem (from a liveimg) is always grown to its
/// target's size, a disk image onto a larger target grown into it (`Rules::grow_to_disk`).
///
/// A device or existing file (`request.force`) cannot be hidden until the customization
/// succeeded: when it fails, the target's first MiB is zeroed so it does not boot an image
/// that was not customized, and the error says so.
pub async fn customize_written(
    written: &Written,
    request: &WriteRequest,
    other_disks: &[GuestDisk],
    mut plan: Plan,
    settings: &VmSettings,
    progress: &dyn Progress,
    interrupt: &Interrupt,
) -> Result<(), JobError> {
    // A liveimg's bare filesystem grows with 15-GrowFilesystem.
    plan.grow_to_disk |= !written.bare_filesystem && target_bytes(&request.target).is_some_and(|t| t > written.bytes);
    if plan.is_empty() && !written.bare_filesystem && !plan.grow_to_disk {
        return Ok(());
    }
    // What was written is raw, whatever its first bytes look like (they are the guest's).
    let mut disks = vec![GuestDisk::new(request.target.clone(), RAW)];
    disks.extend_from_slice(other_disks);
    let result = customize(&disks, plan, written.bare_filesystem, settings, progress, interrupt).await;
    let in_place = request.force || crate::stream::destination::is_block_device(&request.target);
    match result {
        Err(e) if in_place => {
            let target = request.target.clone();
            match blocking("zeroing", move || zero_start(&target)).await? {
                Ok(_) => Err(JobError::StartZeroed { target: request.target.clone(), source: Box::new(e) }),
                Err(zeroing) => {
                    tracing::error!(target = %request.target.display(), error = %zeroing, "cannot zero the start of the target");
                    Err(e)
                }
            }
        }
        other => other,
    }
}

/// The size of a target file or block device, if it can be read.
fn target_bytes(target: &std::path::Path) -> Option<u64> {
    use std::io::Seek;
    std::fs::File::open(target).and_then(|mut f| f.seek(std::io::SeekFrom::End(0))).ok()
}

/// Writes `request`'s image, then customizes it with `plan`. A new file appears under its name
/// only when both succeeded: it is written and customized under a temporary name beside it,
/// removed on any failure or interrupt.
pub async fn deploy(
    request: &WriteRequest,
    mut plan: Plan,
    settings: &VmSettings,
    progress: Arc<dyn Progress>,
    interrupt: &Interrupt,
) -> Result<(), JobError> {
    announce_random_passwords(&mut plan, progress.as_ref());
    let new_file =
        matches!(std::fs::symlink_metadata(&request.target), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    if !new_file {
        let written = write(request, progress.clone(), interrupt).await?;
        return customize_written(&written, request, &[], plan, settings, progress.as_ref(), interrupt).await;
    }
    let temp = TempPath(liveimg::temp_beside(&request.target, "deploy"));
    let to_temp = WriteRequest { target: temp.0.clone(), force: false, ..request.clone() };
    let written = write(&to_temp, progress.clone(), interrupt).await?;
    customize_written(&written, &to_temp, &[], plan, settings, progress.as_ref(), interrupt).await?;
    publish(&temp.0, &request.target).map_err(|source| JobError::Publish { path: request.target.clone(), source })?;
    Ok(())
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
    customize(
        &[GuestDisk::new(rootfs.0.clone(), RAW)],
        plan,
        request.size.is_some(),
        settings,
        progress.as_ref(),
        interrupt,
    )
    .await?;
    progress.status("repacking the liveimg");
    let target = request.target.clone();
    let rootfs_path = rootfs.0.clone();
    let spent = blocking("repack", move || liveimg::repack(&source, &rootfs_path, &target)).await??;
    tracing::info!(secs = spent.as_secs_f32(), "liveimg repacked");
    drop(rootfs);
    Ok(())
}
