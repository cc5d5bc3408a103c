//! `imgforge build RECIPE`: the recipe read and expanded, every variant's operations checked,
//! the base image checked against its SHA-256 (downloaded first when it is a URL), the variants
//! made by [`crate::job::variants::customize_variants`], and a provenance statement written
//! beside each output.

use super::matrix::{self, Variant};
use super::provenance::{self, Facts};
use super::RecipeError;
use crate::job::variants::{customize_variants, OutputFormat, VariantJob, VariantOutcome};
use crate::job::{JobError, KnownFormat, VmSettings};
use crate::ops::entropy::Entropy;
use crate::progress::Progress;
use crate::source::Location;
use crate::vm::Interrupt;
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
) -> Result<(super::Recipe, Vec<(Variant, crate::ops::Plan)>), BuildError> {
    let recipe = super::parse(file, text)?;
    let variants = matrix::expand(&recipe, file)?;
    let seed = request.seed.clone().or_else(|| recipe.seed.clone());
    let mut planned = Vec::with_capacity(variants.len());
    for v in variants {
        let entropy = seed.as_deref().map(|s| Entropy::derived(s, &v.name)).unwrap_or_default();
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

/// The SHA-256 of the file at `path`.
async fn file_sha256(path: &Path) -> Result<String, BuildError> {
    let path = path.to_owned();
    crate::job::blocking("hashing", move || {
        let name = path.display().to_string();
        let file = std::fs::File::open(&path)
            .map_err(|source| crate::source::SourceError::Io { name: name.clone(), source })?;
        crate::job::write::sha256_of_file(&file, &name, &Default::default())
    })
    .await?
    .map_err(|e| BuildError::Job(e.into()))
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
    let bytes =
        std::fs::read(&request.recipe).map_err(|source| BuildError::Read { path: request.recipe.clone(), source })?;
    let text = String::from_utf8(bytes.clone()).map_err(|_| RecipeError {
        file: file.clone(),
        line: 0,
        message: "the recipe is not UTF-8 text (TOML)".into(),
    })?;
    let recipe_sha256 = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&bytes))
    };
    let (recipe, planned) = prepare(request, &text, &file)?;
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
    for (v, _) in &planned {
        let output = request.out_dir.join(&v.output);
        if output.exists() || output.with_file_name(format!("{}{}", v.output, provenance::SUFFIX)).exists() {
            return Err(BuildError::OutputExists(output));
        }
    }

    progress.status("checking the base image");
    let (base, base_format, downloaded) = match base_location(&request.recipe, &recipe.base_image) {
        Location::Path(path) => {
            let actual = file_sha256(&path).await?;
            if actual != recipe.base_sha256 {
                return Err(BuildError::BaseMismatch {
                    image: path.display().to_string(),
                    recipe: file,
                    expected: recipe.base_sha256,
                    actual,
                });
            }
            (path, KnownFormat::FromHeader, None)
        }
        Location::Url(url) => {
            // Downloaded once, checked before it is kept; a thin (qcow2-backed) output needs it
            // after the build, so it stays in the output directory, named for its digest.
            let target = request.out_dir.join(format!("base-{}.img", &recipe.base_sha256[..16]));
            // A file left there cannot be checked (it holds the decoded image, not the bytes the
            // digest is of): refused like an output.
            if target.exists() {
                return Err(BuildError::OutputExists(target));
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
            (target.clone(), KnownFormat::Given(crate::vm::cmdline::DiskFormat::Raw), (!keep).then_some(target))
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
    let outcomes =
        customize_variants(&base, base_format, jobs, request.jobs, settings, progress.as_ref(), interrupt).await;
    if let Some(d) = downloaded {
        let _ = std::fs::remove_file(d);
    }

    let helper_image = {
        let cache = crate::helper_image::cache_dir();
        crate::job::blocking("helper image", move || crate::helper_image::ensure(&cache))
            .await?
            .map_err(|e| BuildError::Job(e.into()))?
            .key
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

/// `imgforge verify --provenance FILE IMAGE`: the image's digest against the statement's
/// subject; the subject's name on success.
pub fn verify_provenance(statement_path: &Path, image: &Path) -> Result<String, VerifyProvenanceError> {
    let text = std::fs::read_to_string(statement_path)
        .map_err(|source| VerifyProvenanceError::Read { path: statement_path.to_owned(), source })?;
    let statement: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        VerifyProvenanceError::Check(provenance::ProvenanceError::Shape(format!(
            "{} is not JSON: {e}",
            statement_path.display()
        )))
    })?;
    provenance::subject(&statement)?;
    let file =
        std::fs::File::open(image).map_err(|source| VerifyProvenanceError::Read { path: image.to_owned(), source })?;
    let actual =
        crate::job::write::sha256_of_file(&file, &image.display().to_string(), &Default::default()).map_err(|e| {
            VerifyProvenanceError::Read { path: image.to_owned(), source: std::io::Error::other(e.to_string()) }
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
    /// The statement does not vouch for the image (exit 1).
    #[error(transparent)]
    Check(#[from] provenance::ProvenanceError),
}
