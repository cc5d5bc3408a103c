//! The events of the progress stream and their JSON form (`docs/progress-v1.schema.json`).
//!
//! snf-image's monitor message types (`image-info`, `image-copy-progress`, `image-helper`,
//! `image-error`, `image-done`) keep every field name and value snf-image monitors (Ganeti's
//! PROGRESS_MONITOR, Synnefo's snf-progress-monitor) read; imgforge adds `"v"` on every line
//! and its own types beside them.

use imgforge_protocol::change::FileChange;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// The version of the stream, `"v"` on every line. It changes when a field is removed,
/// renamed or changes meaning; new types and new fields come without a change, and a reader
/// ignores what it does not know.
pub const VERSION: u32 = 1;

/// One line of the stream: an event with the stream's version and the time it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// [`VERSION`].
    pub v: u32,
    /// Seconds since the Unix epoch, as snf-image writes them.
    pub timestamp: f64,
    /// What happened (its `type` and fields).
    #[serde(flatten)]
    pub event: Event,
}

impl Line {
    /// `event`, now, in this version of the stream.
    pub fn now(event: Event) -> Self {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Self { v: VERSION, timestamp, event }
    }
}

/// What happened, by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Event {
    /// `image-info`: what is being written or customized.
    ImageInfo(ImageInfo),
    /// `image-copy-progress`: bytes written so far.
    ImageCopyProgress {
        /// Bytes written.
        position: u64,
        /// Bytes to write, where known.
        total: Option<u64>,
        /// `position` in percent of `total` (0..100, two decimals), where `total` is known.
        progress: Option<f64>,
    },
    /// `image-helper`: the helper VM's tasks and phases, by `subtype`.
    ImageHelper(HelperEvent),
    /// `image-error`: the job failed.
    ImageError {
        /// Why.
        messages: Vec<String>,
    },
    /// `image-done`: the job succeeded.
    ImageDone,
    /// `file-change`: a dry run (`customize -n`) added, removed or changed this guest path;
    /// nothing of it reached the disk.
    FileChange(FileChange),
    /// `file-changes-omitted`: a dry run changed `count` paths more than it listed.
    FileChangesOmitted {
        /// How many.
        count: u64,
    },
    /// `variant-started`: `imgforge build` began variant `name` (`index` of `total`, from 0).
    VariantStarted {
        /// The variant.
        name: String,
        /// Its place in the build, from 0.
        index: usize,
        /// Variants in the build.
        total: usize,
    },
    /// `variant-done`: variant `name` was written to `output`.
    VariantDone {
        /// The variant.
        name: String,
        /// Its place in the build, from 0.
        index: usize,
        /// Variants in the build.
        total: usize,
        /// The output file.
        output: String,
    },
    /// `variant-failed`: variant `name` failed (the others go on).
    VariantFailed {
        /// The variant.
        name: String,
        /// Its place in the build, from 0.
        index: usize,
        /// Variants in the build.
        total: usize,
        /// Why.
        messages: Vec<String>,
    },
    /// `random-password`: the job sets a random password for `user`. The password itself
    /// never goes into the stream: only the command line shows it, to the person who ran it.
    RandomPassword {
        /// Whose.
        user: String,
        /// In which variant of `imgforge build` (absent outside a build): with several
        /// variants, each password must be told apart.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        variant: Option<String>,
        /// The clear text, for the command line's display only.
        #[serde(skip)]
        password: Secret,
    },
}

impl Event {
    /// `image-copy-progress` at `position` of `total` bytes.
    pub fn copy_progress(position: u64, total: Option<u64>) -> Self {
        let percent = total.filter(|t| *t > 0).map(|t| (position as f64 * 100.0 / t as f64).min(100.0));
        Event::ImageCopyProgress { position, total, progress: percent.map(|p| (p * 100.0).round() / 100.0) }
    }

    /// `image-error` with one message.
    pub fn error(message: &str) -> Self {
        Event::ImageError { messages: vec![message.to_owned()] }
    }
}

/// The `image-helper` events, by `subtype`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "subtype", rename_all = "kebab-case")]
pub enum HelperEvent {
    /// A task started.
    TaskStart {
        /// `NN-Name`.
        task: String,
    },
    /// A task ended successfully.
    TaskEnd {
        /// `NN-Name`.
        task: String,
    },
    /// A task warned.
    Warning {
        /// `NN-Name`.
        task: String,
        /// The warning.
        messages: Vec<String>,
    },
    /// A task failed.
    Error {
        /// `NN-Name`.
        task: String,
        /// Why.
        messages: Vec<String>,
    },
    /// The helper VM reached a phase (imgforge's addition to snf-image's subtypes).
    Phase {
        /// Which (`qemu started (kvm)`, `first console line`, `helper rules read`, ...).
        phase: String,
        /// Milliseconds since qemu started, on the host's clock.
        host_ms: u64,
        /// The guest's uptime in milliseconds, where the helper reported it.
        guest_ms: Option<u64>,
    },
}

impl From<HelperEvent> for Event {
    fn from(event: HelperEvent) -> Self {
        Event::ImageHelper(event)
    }
}

/// `image-info`: the source and target of a write (`source`, `target`), or the disk a helper
/// run customizes (`path`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The image written: a path or URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The disk customized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The format found (`raw`, `gzip`, `qcow2`, `liveimg`, ...).
    pub format: String,
    /// Bytes the image holds (written onto the target), where known.
    pub size: Option<u64>,
    /// The filesystem image inside a liveimg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Bytes to download, as the server announced them (a URL source only; null when it did not).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "present")]
    pub download_size: Option<Option<u64>>,
    /// Where the image goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl ImageInfo {
    /// The image `source` (`format`, `size` bytes) being written onto `target`.
    pub fn source(source: &str, format: &str, size: Option<u64>, target: &Path) -> Self {
        Self {
            source: Some(source.to_owned()),
            format: format.to_owned(),
            size,
            target: Some(target.display().to_string()),
            ..Self::default()
        }
    }

    /// The disk at `path` (`format`, `size` bytes) a helper run customizes.
    pub fn disk(path: &Path, format: &str, size: u64) -> Self {
        Self { path: Some(path.display().to_string()), format: format.to_owned(), size: Some(size), ..Self::default() }
    }

    /// With the filesystem image `rootfs` a liveimg holds.
    pub fn with_rootfs(self, rootfs: &str) -> Self {
        Self { rootfs: Some(rootfs.to_owned()), ..self }
    }

    /// With the download's announced length (`None`: the server announced none).
    pub fn with_download_size(self, length: Option<u64>) -> Self {
        Self { download_size: Some(length), ..self }
    }
}

impl From<ImageInfo> for Event {
    fn from(info: ImageInfo) -> Self {
        Event::ImageInfo(info)
    }
}

/// A field that is either absent (`None`) or present and possibly null (`Some(None)`).
mod present {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(value: &Option<Option<T>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// Clear text that must not be printed by accident: `Debug` shows no content, and the stream
/// never serializes it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text`.
    pub fn new(text: String) -> Self {
        Self(text)
    }

    /// The clear text, for the one place that shows it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}
