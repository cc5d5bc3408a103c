//! `imgforge build RECIPE`: the recipe read and expanded, every variant's operations checked,
//! the base image checked against its SHA-256 (downloaded first when it is a URL), the variants
//! made by [`crate::job::variants::customize_variants`], and a provenance statement written
//! beside each output.

use super::matrix::{self, Variant};
use super::provenance::{self, Facts};
use super::RecipeError;
use crate::job::variants::{customize_variants, BaseCheck, OutputFormat, VariantBase, VariantJob, VariantOutcome};
use crate::job::{JobError, KnownFormat, VmSettings};
use crate::ops::entropy::Entropy;
use crate::progress::Progress;
use crate::source::Location;
use crate::vm::Interrupt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The recipe file.
    pub recipe: PathBuf,
    /// Where the outputs go (created if missing).
    pub out_dir: PathBuf,
    /// Helper VMs side by side.
    pub jobs: usize,
    /// `--seed`, over the recipe's `seed`.
    pub seed: Option<String>,
    /// `SOURCE_DATE_EPOCH` from the environment (the recipe's `source_date_epoch` wins).
    pub env_source_date_epoch: Option<String>,
    /// `imgforge --version`'s text, for provenance.
    pub imgforge_version: String,
}

/// Why a build did not produce every variant.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The recipe file cannot be read.
    #[error("cannot read recipe {}: {source}", path.display())]
    Read {
        /// The recipe.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The recipe (or a variant's operations) is wrong.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// `SOURCE_DATE_EPOCH` in the environment is not a number of seconds.
    #[error(
        "SOURCE_DATE_EPOCH={0:?} is not whole seconds since 1970 (unset it, or set source_date_epoch in the recipe)"
    )]
    SourceDateEpoch(String),
    /// The base image is not the one the recipe names.
    #[error("base image {image} has sha256 {actual}, the recipe {recipe} says {expected}: nothing was built")]
    BaseMismatch {
        /// The base as given.
        image: String,
        /// The recipe.
        recipe: String,
        /// The recipe's digest.
        expected: String,
        /// The file's.
        actual: String,
    },
    /// The base image's path names no regular file (a FIFO, a device, a directory).
    #[error("base image {}: {what}, not a regular file: give the image file (a device or pipe has no digest to check)", path.display())]
    BaseNotAFile {
        /// The base as resolved.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// An output is already there (outputs are never overwritten).
    #[error("{} exists: imgforge build never overwrites an output; remove it or choose another --out-dir", .0.display())]
    OutputExists(PathBuf),
    /// A file of the build cannot be written or read.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The base image cannot be read, downloaded or checked, or the helper image prepared.
    #[error(transparent)]
    Job(#[from] JobError),
    /// Some variants failed; the others were written.
    #[error("{} of {total} variants failed: {}", failed.len(), failed.iter().map(|(n, e)| format!("{n} ({e})")).collect::<Vec<_>>().join("; "))]
    Variants {
        /// Variants in the build.
        total: usize,
        /// The failed ones, by name, with why.
        failed: Vec<(String, JobError)>,
    },
}

/// One variant written.
#[derive(Debug, Clone)]
pub struct Built {
    /// The variant.
    pub name: String,
    /// Its output.
    pub output: PathBuf,
    /// Its provenance statement.
    pub provenance: PathBuf,
}

/// The variants of the recipe at `path` (its text `text`), each with its checked plan.
fn prepare(
    request: &BuildRequest,
    text: &str,
    file: &str,
    recipe_sha256: &str,
) -> Result<(super::Recipe, Vec<(Variant, crate::ops::Plan)>), BuildError> {
    let recipe = super::parse(file, text)?;
    let variants = matrix::expand(&recipe, file)?;
    let seed = request.seed.clone().or_else(|| recipe.seed.clone());
    let mut planned = Vec::with_capacity(variants.len());
    for v in variants {
        // Bound to the recipe too: one seed used for two recipes (staging and production, or
        // two recipes whose one variant is `default`) gives them different salts and passwords.
        let scope = format!("{recipe_sha256}/{}", v.name);
        let entropy = seed.as_deref().map(|s| Entropy::derived(s, &scope)).unwrap_or_default();
        let plan = matrix::plan(&v.operations, entropy, file)
            .map_err(|e| RecipeError { message: format!("variant {}: {}", v.name, e.message), ..e })?;
        planned.push((v, plan));
    }
    Ok((recipe, planned))
}

/// Where the base image is: the recipe's path (relative to the recipe's directory) or URL.
fn base_location(recipe_path: &Path, image: &str) -> Location {
    match Location::parse(image) {
        Location::Path(p) if p.is_relative() => Location::Path(recipe_path.parent().unwrap_or(Path::new("")).join(p)),
        other => other,
    }
}

/// Refuses a base that is not a regular file (a symlink to one is followed): opening a FIFO
/// blocks until someone writes to it, and a device such as /dev/zero never ends.
fn base_is_a_file(path: &Path) -> Result<(), BuildError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |source| {
        let e = crate::source::SourceError::Io { name: path.display().to_string(), source };
        BuildError::Job(crate::job::write::WriteError::from(e).into())
    };
    let kind = std::fs::metadata(path).map_err(io)?.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_block_device() || kind.is_char_device() {
        Some("a device")
    } else {
        Some("a special file")
    };
    match what {
        Some(what) => Err(BuildError::BaseNotAFile { path: path.to_owned(), what }),
        None => Ok(()),
    }
}

/// The SHA-256 of the regular file at `path` (a symlink to one is followed); an interrupt
/// stops the hashing.
async fn file_sha256(path: &Path, interrupt: &Interrupt) -> Result<String, BuildError> {
    // Checked again: the path may have changed since.
    base_is_a_file(path)?;
    let path = path.to_owned();
    let hashed = crate::job::cancellable("hashing the base image", interrupt, move |cancel| {
        let name = path.display().to_string();
        // O_NONBLOCK: should the path have become a FIFO since, opening it does not hang.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|source| crate::source::SourceError::Io { name: name.clone(), source })?;
        crate::job::write::sha256_of_file(&file, &name, cancel)
    })
    .await;
    Ok(hashed?)
}

/// Builds every variant of `request.recipe`.
pub async fn build(
    request: &BuildRequest,
    settings: &VmSettings,
    progress: Arc<dyn Progress>,
    interrupt: &Interrupt,
) -> Result<Vec<Built>, BuildError> {
    let started = provenance::rfc3339(now_secs());
    let file = request.recipe.display().to_string();
    let read_error = |source| BuildError::Read { path: request.recipe.clone(), source };
    // Bounded: the path may name a device or a pipe that never ends (a pipe is fine: `<(...)`).
    let mut bytes = Vec::new();
    {
        use std::io::Read;
        std::fs::File::open(&request.recipe)
            .and_then(|f| f.take(MAX_RECIPE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(read_error)?;
    }
    if bytes.len() as u64 > MAX_RECIPE_BYTES {
        return Err(read_error(std::io::Error::other(format!(
            "too large for a recipe (more than {MAX_RECIPE_BYTES} bytes)"
        ))));
    }
    let text = String::from_utf8(bytes.clone()).map_err(|_| RecipeError {
        file: file.clone(),
        line: 0,
        message: "the recipe is not UTF-8 text (TOML)".into(),
    })?;
    let recipe_sha256 = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&bytes))
    };
    let (recipe, planned) = prepare(request, &text, &file, &recipe_sha256)?;
    let source_date_epoch = match (recipe.source_date_epoch, &request.env_source_date_epoch) {
        (Some(s), _) => Some(s),
        (None, Some(env)) => Some(env.trim().parse().map_err(|_| BuildError::SourceDateEpoch(env.clone()))?),
        (None, None) => None,
    };
    std::fs::create_dir_all(&request.out_dir).map_err(|source| BuildError::Io {
        what: "cannot create the output directory",
        path: request.out_dir.clone(),
        source,
    })?;
    // symlink_metadata: a dangling symlink is in the way too (the final rename would fail).
    let taken = |path: &Path| std::fs::symlink_metadata(path).is_ok();
    for (v, _) in &planned {
        let output = request.out_dir.join(&v.output);
        let statement = request.out_dir.join(format!("{}{}", v.output, provenance::SUFFIX));
        if let Some(path) = [output, statement].into_iter().find(|p| taken(p)) {
            return Err(BuildError::OutputExists(path));
        }
    }

    progress.status("checking the base image");
    // A base file is hashed while the helper VMs boot (`BaseCheck`); a download is checked as
    // it is written, before anything uses it.
    let (base, base_format, downloaded, hash_beside) = match base_location(&request.recipe, &recipe.base_image) {
        Location::Path(path) => {
            base_is_a_file(&path)?;
            (path, KnownFormat::FromHeader, None, true)
        }
        Location::Url(url) => {
            // Downloaded once, checked before it is kept; a thin (qcow2-backed) output needs it
            // after the build, so it stays in the output directory, named for its digest.
            let target = request.out_dir.join(format!("base-{}.img", &recipe.base_sha256[..16]));
            // A file left there cannot be checked (it holds the decoded image, not the bytes the
            // digest is of): refused like an output.
            if std::fs::symlink_metadata(&target).is_ok() {
                return Err(BuildError::OutputExists(target));
            }
            if let Some((v, _)) = planned.iter().find(|(v, _)| target.file_name() == Some(v.output.as_ref())) {
                return Err(BuildError::Recipe(RecipeError {
                    file,
                    line: recipe.output.line,
                    message: format!(
                        "variant {} would write {}, where the downloaded base goes: name the outputs otherwise",
                        v.name, v.output
                    ),
                }));
            }
            let write = crate::job::write::WriteRequest {
                confinement: settings.confinement(),
                image: Location::Url(url),
                target: target.clone(),
                force: false,
                size: None,
                sha256: Some(recipe.base_sha256.clone()),
                sha256_before_write: true,
                backing_file: None,
                http: Default::default(),
                reach: crate::source::reach::Reach::Any,
            };
            crate::job::write(&write, progress.clone(), interrupt).await?;
            let keep = recipe.format == OutputFormat::Qcow2Backed;
            (target.clone(), KnownFormat::Given(crate::vm::cmdline::DiskFormat::Raw), (!keep).then_some(target), false)
        }
    };

    let total = planned.len();
    let mut described = Vec::with_capacity(total);
    let mut jobs = Vec::with_capacity(total);
    for (v, plan) in planned {
        let output = request.out_dir.join(&v.output);
        jobs.push(VariantJob { name: v.name.clone(), plan, output, format: recipe.format, source_date_epoch });
        described.push(v);
    }
    // The base's SHA-256: a download's was checked before its conversion (which fixes the raw
    // image made from it); a file's is checked beside the build, and nothing is published
    // before it passes.
    let (verdict, check) = BaseCheck::pending();
    let variant_base = VariantBase {
        path: base.clone(),
        format: base_format,
        sha256: Some(recipe.base_sha256.to_ascii_lowercase()),
        check: hash_beside.then_some(check),
    };
    // The helper VMs stop on a signal or on a failed check of the base.
    let (stop_tx, stop) = tokio::sync::watch::channel(*interrupt.borrow());
    let stop_tx = std::sync::Arc::new(stop_tx);
    let forwarder = {
        let (tx, mut outer) = (stop_tx.clone(), interrupt.clone());
        tokio::spawn(async move {
            while outer.changed().await.is_ok() {
                let signal = *outer.borrow();
                if signal.is_some() {
                    let _ = tx.send(signal);
                }
            }
        })
    };
    let checking = async {
        if !hash_beside {
            return Ok(());
        }
        let checked = match file_sha256(&base, interrupt).await {
            Ok(actual) if actual == recipe.base_sha256 => Ok(()),
            Ok(actual) => Err(BuildError::BaseMismatch {
                image: base.display().to_string(),
                recipe: file.clone(),
                expected: recipe.base_sha256.clone(),
                actual,
            }),
            Err(e) => Err(e),
        };
        let _ = verdict.send(Some(checked.as_ref().map(|_| ()).map_err(|e| e.to_string())));
        if checked.is_err() {
            // Not the base the recipe names: the helper VMs are stopped, as by a signal.
            let _ = stop_tx.send(Some("a failed check of the base image"));
        }
        checked
    };
    let (checked, outcomes) = tokio::join!(
        checking,
        customize_variants(&variant_base, jobs, request.jobs, settings, progress.as_ref(), &stop)
    );
    forwarder.abort();
    checked?;
    if let Some(d) = downloaded {
        let _ = std::fs::remove_file(d);
    }

    let helper_image = {
        let cache = crate::helper_image::cache_dir();
        let image = crate::job::blocking("helper image", move || crate::helper_image::ensure(&cache))
            .await?
            .map_err(|e| BuildError::Job(e.into()))?;
        let what = "cannot hash the helper image";
        let path = image.initrd.clone();
        crate::job::blocking("hashing the helper image", move || helper_image_sha256(&image))
            .await?
            .map_err(|source| BuildError::Io { what, path, source })?
    };
    let base_shown = crate::source::http::redact(&recipe.base_image);
    let mut built = Vec::new();
    let mut failed = Vec::new();
    for (VariantOutcome { name, result }, v) in outcomes.into_iter().zip(&described) {
        let product = match result {
            Ok(p) => p,
            Err(e) => {
                failed.push((name, e));
                continue;
            }
        };
        let operations: Vec<String> = v.operations.iter().map(|o| matrix::redacted(&o.text)).collect();
        let statement = provenance::statement(&Facts {
            output_name: &v.output,
            output_sha256: &product.output_sha256,
            variant: &v.name,
            vars: &v.vars,
            format: recipe.format.as_str(),
            recipe: (&file, &recipe_sha256),
            base: (&base_shown, &recipe.base_sha256),
            operations: &operations,
            seeded: request.seed.is_some() || recipe.seed.is_some(),
            source_date_epoch,
            imgforge_version: &request.imgforge_version,
            helper_image: &helper_image,
            manifest_sha256: &product.manifest_sha256,
            changes: &product.changes,
            started: &started,
            finished: &provenance::rfc3339(now_secs()),
        });
        let path = request.out_dir.join(format!("{}{}", v.output, provenance::SUFFIX));
        write_new(&path, &format!("{statement:#}\n"))?;
        built.push(Built { name, output: product.output, provenance: path });
    }
    if failed.is_empty() {
        Ok(built)
    } else {
        Err(BuildError::Variants { total, failed })
    }
}

/// The SHA-256 of the helper image's kernel and initramfs, in that order: the digest its
/// content key is the first half of (the key alone is 128 bits, not a SHA-256, which is what
/// provenance's `sha256` must hold).
fn helper_image_sha256(image: &crate::helper_image::HelperImage) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for path in [&image.kernel, &image.initrd] {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf)? {
                0 => break,
                n => h.update(&buf[..n]),
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes `text` to a new file `path` (temporary name, then renamed: never half there).
fn write_new(path: &Path, text: &str) -> Result<(), BuildError> {
    let io = |source| BuildError::Io { what: "cannot write", path: path.to_owned(), source };
    let temp = crate::source::liveimg::TempPath(crate::source::liveimg::temp_beside(path, "provenance"));
    std::fs::write(&temp.0, text).map_err(io)?;
    crate::stream::destination::publish(&temp.0, path).map_err(io)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The largest recipe `imgforge build` reads (a recipe of a thousand variants' rules is a few
/// hundred KiB).
pub const MAX_RECIPE_BYTES: u64 = 4 << 20;

/// The largest provenance statement `verify --provenance` reads (imgforge writes a few KiB; the
/// list of changed files can make it larger, never near this).
pub const MAX_STATEMENT_BYTES: u64 = 16 << 20;

/// `imgforge verify --provenance FILE IMAGE`: the image's digest against the statement's
/// subject; the subject's name on success.
pub fn verify_provenance(
    statement_path: &Path,
    image: &Path,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<String, VerifyProvenanceError> {
    use std::io::Read;
    let read_error = |source| VerifyProvenanceError::Read { path: statement_path.to_owned(), source };
    // Bounded: a statement is small, and the path could name anything (a device, a huge file).
    let mut text = String::new();
    std::fs::File::open(statement_path)
        .and_then(|f| f.take(MAX_STATEMENT_BYTES + 1).read_to_string(&mut text))
        .map_err(read_error)?;
    if text.len() as u64 > MAX_STATEMENT_BYTES {
        return Err(read_error(std::io::Error::other(format!(
            "too large for a provenance statement (more than {MAX_STATEMENT_BYTES} bytes)"
        ))));
    }
    let statement: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        VerifyProvenanceError::Check(provenance::ProvenanceError::Shape(format!(
            "{} is not JSON: {e}",
            statement_path.display()
        )))
    })?;
    provenance::subject(&statement)?;
    let file =
        std::fs::File::open(image).map_err(|source| VerifyProvenanceError::Read { path: image.to_owned(), source })?;
    let actual = crate::job::write::sha256_of_file(&file, &image.display().to_string(), cancel).map_err(|e| {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            VerifyProvenanceError::Interrupted
        } else {
            VerifyProvenanceError::Read { path: image.to_owned(), source: std::io::Error::other(e.to_string()) }
        }
    })?;
    Ok(provenance::check(&statement, &actual)?)
}

/// Why `verify --provenance` failed.
#[derive(Debug, Error)]
pub enum VerifyProvenanceError {
    /// A file cannot be read (exit 2).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A signal stopped the check (exit 130).
    #[error("interrupted while hashing the image")]
    Interrupted,
    /// The statement does not vouch for the image (exit 1).
    #[error(transparent)]
    Check(#[from] provenance::ProvenanceError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// One seed, two recipes: different salts (the derivation is bound to the recipe's
    /// digest); the same recipe twice: the same.
    #[test]
    fn a_seed_is_bound_to_its_recipe() {
        let request = BuildRequest {
            recipe: "r.toml".into(),
            out_dir: "out".into(),
            jobs: 1,
            seed: Some("one-seed".into()),
            env_source_date_epoch: None,
            imgforge_version: String::new(),
        };
        let text =
            "name = \"default\"\noperations = [\"root-password password:Pw-1\"]\n[base]\nimage = \"b.img\"\nsha256 = \""
                .to_owned()
                + &"0".repeat(64) + "\"\n";
        let field = |recipe_sha256: &str| {
            let (_, planned) = prepare(&request, &text, "r.toml", recipe_sha256).unwrap();
            match &planned[0].1.operations[0] {
                imgforge_protocol::rules::Operation::Password { shadow_field, .. } => shadow_field.clone(),
                other => panic!("{other:?}"),
            }
        };
        let (staging, production) = (&"a".repeat(64), &"b".repeat(64));
        assert_eq!(field(staging), field(staging));
        assert_ne!(field(staging), field(production));
    }

    fn statement_for(digest: &str) -> serde_json::Value {
        serde_json::json!({
            "_type": provenance::STATEMENT_TYPE,
            "predicateType": provenance::PREDICATE_TYPE,
            "subject": [{"name": "a.img", "digest": {"sha256": digest}}],
            "predicate": {
                "buildDefinition": {"buildType": provenance::BUILD_TYPE},
                "runDetails": {"builder": {"id": provenance::BUILDER_ID}},
            },
        })
    }

    /// The helper image's digest in provenance is a whole SHA-256 (64 hex digits) that its
    /// 32-digit content key begins with.
    #[test]
    fn the_helper_image_digest_is_a_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, initrd) = (dir.path().join("kernel"), dir.path().join("initrd.cpio"));
        std::fs::write(&kernel, b"kernel bytes").unwrap();
        std::fs::write(&initrd, b"initrd bytes").unwrap();
        let key =
            hex::encode(&Sha256::new().chain_update(b"kernel bytes").chain_update(b"initrd bytes").finalize()[..16]);
        let image = crate::helper_image::HelperImage { kernel, initrd, key: key.clone(), package: "k.deb".into() };
        let digest = helper_image_sha256(&image).unwrap();
        assert_eq!(digest.len(), 64);
        assert!(digest.starts_with(&key), "{digest} / {key}");
        assert!(crate::job::write::check_sha256_arg(&digest).is_ok());
    }

    /// A statement is small: one far past any imgforge writes (a padded file, a device) is
    /// refused without reading it all into memory.
    #[test]
    fn oversized_statements_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.img");
        std::fs::write(&image, b"image").unwrap();
        let digest = hex::encode(Sha256::digest(b"image"));
        let statement = dir.path().join("a.img.provenance.json");
        std::fs::write(&statement, statement_for(&digest).to_string()).unwrap();
        let go = std::sync::atomic::AtomicBool::new(false);
        assert_eq!(verify_provenance(&statement, &image, &go).unwrap(), "a.img");
        let padded = format!("{}{}", statement_for(&digest), " ".repeat(MAX_STATEMENT_BYTES as usize));
        std::fs::write(&statement, padded).unwrap();
        let e = verify_provenance(&statement, &image, &go).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        let e = verify_provenance(Path::new("/dev/zero"), &image, &go).unwrap_err();
        assert!(e.to_string().contains("too large") || e.to_string().contains("not a regular file"), "{e}");
    }
}
