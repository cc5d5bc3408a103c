//! Provenance beside each output of `imgforge build`: an in-toto Statement v1 whose predicate
//! has SLSA provenance v1's shape, and the check `imgforge verify --provenance` makes of it.
//!
//! Building and checking are pure (values in, JSON or a verdict out); the caller hashes files.

use serde_json::{json, Value};

/// in-toto's statement type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// SLSA provenance v1's predicate type.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// What an imgforge recipe build is, for `buildDefinition.buildType` (a URN: the project
/// publishes no URL for it; README.md's "Recipes" section describes it).
pub const BUILD_TYPE: &str = "urn:imgforge:build-type:recipe:v1";
/// The builder's id.
pub const BUILDER_ID: &str = "urn:imgforge:builder:imgforge-build";
/// The suffix of the statement written beside an output.
pub const SUFFIX: &str = ".provenance.json";

/// Everything a statement records of one variant.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// The output's file name.
    pub output_name: &'a str,
    /// Its SHA-256.
    pub output_sha256: &'a str,
    /// The variant's name and variables.
    pub variant: &'a str,
    /// Variable = value.
    pub vars: &'a [(String, String)],
    /// The output format's name.
    pub format: &'a str,
    /// The recipe as given, and its SHA-256.
    pub recipe: (&'a str, &'a str),
    /// The base image as given (a URL without its credentials), and its SHA-256.
    pub base: (&'a str, &'a str),
    /// The operations as resolved (placeholders substituted), secrets redacted.
    pub operations: &'a [String],
    /// Whether random choices derived from a seed (the seed itself is never recorded).
    pub seeded: bool,
    /// The files' times, if fixed.
    pub source_date_epoch: Option<i64>,
    /// `imgforge --version`'s text.
    pub imgforge_version: &'a str,
    /// The helper image's content key (SHA-256 of its kernel and initramfs).
    pub helper_image: &'a str,
    /// The guest tree manifest's SHA-256 (empty when not computed).
    pub manifest_sha256: &'a str,
    /// The paths the operations added, changed or removed.
    pub changes: &'a [imgforge_protocol::change::FileChange],
    /// When the build started and this variant finished (RFC 3339).
    pub started: &'a str,
    /// When this variant finished.
    pub finished: &'a str,
}

/// The statement for `facts`.
pub fn statement(facts: &Facts) -> Value {
    let vars: serde_json::Map<String, Value> =
        facts.vars.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let mut byproducts = Vec::new();
    // The changes are listed only with the manifest they come with: without it they were not
    // computed, and an empty list would say that nothing changed.
    if !facts.manifest_sha256.is_empty() {
        byproducts.push(json!({"name": "tree-manifest", "digest": {"sha256": facts.manifest_sha256}}));
        byproducts.push(json!({
            "name": "changed-files",
            "mediaType": "application/json",
            "annotations": {"changes": facts.changes},
        }));
    }
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": facts.output_name, "digest": {"sha256": facts.output_sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": {"uri": facts.recipe.0, "digest": {"sha256": facts.recipe.1}},
                    "variant": facts.variant,
                    "matrix": vars,
                    "format": facts.format,
                    "seeded": facts.seeded,
                    "source_date_epoch": facts.source_date_epoch,
                },
                "internalParameters": {"operations": facts.operations},
                "resolvedDependencies": [
                    {"name": "base-image", "uri": facts.base.0, "digest": {"sha256": facts.base.1}},
                    {"name": "helper-image", "digest": {"sha256": facts.helper_image}},
                ],
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"imgforge": facts.imgforge_version}},
                "metadata": {"startedOn": facts.started, "finishedOn": facts.finished},
                "byproducts": byproducts,
            },
        },
    })
}

/// Why a statement does not vouch for an image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProvenanceError {
    /// Not an in-toto statement of SLSA provenance as imgforge writes them.
    #[error("{0}")]
    Shape(String),
    /// The image is not the subject.
    #[error("the image's sha256 is {actual}, but the provenance's subject {name} has sha256 {expected}: the image is not the one built")]
    Mismatch {
        /// The subject's name.
        name: String,
        /// Its digest.
        expected: String,
        /// The image's.
        actual: String,
    },
}

/// The subject `statement` names (name, sha256), after checking the statement's shape.
pub fn subject(statement: &Value) -> Result<(String, String), ProvenanceError> {
    let shape = |what: &str| ProvenanceError::Shape(format!("not an imgforge provenance statement: {what}"));
    if statement["_type"] != STATEMENT_TYPE {
        return Err(shape(&format!("_type is not {STATEMENT_TYPE}")));
    }
    if statement["predicateType"] != PREDICATE_TYPE {
        return Err(shape(&format!("predicateType is not {PREDICATE_TYPE}")));
    }
    let predicate = &statement["predicate"];
    if !predicate["buildDefinition"]["buildType"].is_string() || !predicate["runDetails"]["builder"]["id"].is_string() {
        return Err(shape("the predicate lacks buildDefinition.buildType or runDetails.builder.id"));
    }
    let subjects = statement["subject"].as_array().ok_or_else(|| shape("subject is not a list"))?;
    let [only] = subjects.as_slice() else {
        return Err(shape(&format!("{} subjects (imgforge writes one per output)", subjects.len())));
    };
    let name = only["name"].as_str().ok_or_else(|| shape("the subject has no name"))?;
    let digest = only["digest"]["sha256"].as_str().ok_or_else(|| shape("the subject has no sha256 digest"))?;
    let digest = crate::job::write::check_sha256_arg(digest).map_err(|e| shape(&format!("subject digest: {e}")))?;
    Ok((name.to_owned(), digest))
}

/// Checks that the image whose SHA-256 is `actual` is the subject of `statement`.
pub fn check(statement: &Value, actual: &str) -> Result<String, ProvenanceError> {
    let (name, expected) = subject(statement)?;
    if expected != actual.to_ascii_lowercase() {
        return Err(ProvenanceError::Mismatch { name, expected, actual: actual.to_owned() });
    }
    Ok(name)
}

/// RFC 3339 UTC of seconds since the epoch (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn sample() -> Value {
        sample_with_manifest("")
    }

    /// The sample statement, with the tree manifest's digest `manifest_sha256` ("": none).
    fn sample_with_manifest(manifest_sha256: &str) -> Value {
        let vars = [("site".to_owned(), "ath".to_owned())];
        let ops = ["hostname ath".to_owned(), "root-password password:<redacted>".to_owned()];
        statement(&Facts {
            output_name: "ath.img",
            output_sha256: A,
            variant: "ath",
            vars: &vars,
            format: "raw",
            recipe: ("r.toml", B),
            base: ("base.img", B),
            operations: &ops,
            seeded: true,
            source_date_epoch: Some(0),
            imgforge_version: "0.1.0",
            helper_image: B,
            manifest_sha256,
            changes: &[],
            started: "1970-01-01T00:00:00Z",
            finished: "1970-01-01T00:00:00Z",
        })
    }

    #[test]
    fn statements_have_the_in_toto_and_slsa_shape() {
        let s = sample();
        assert_eq!(s["_type"], STATEMENT_TYPE);
        assert_eq!(s["subject"][0]["digest"]["sha256"], A);
        assert_eq!(s["predicate"]["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"], B);
        assert_eq!(
            s["predicate"]["buildDefinition"]["internalParameters"]["operations"][1],
            "root-password password:<redacted>"
        );
        assert_eq!(check(&s, A), Ok("ath.img".into()));
        assert_eq!(check(&s, &A.to_uppercase()), Ok("ath.img".into()));
    }

    /// Without a tree manifest (not computed) the statement lists no changes rather than an
    /// empty list, which would claim the operations changed nothing.
    #[test]
    fn uncomputed_changes_are_not_claimed() {
        let names = |s: &Value| -> Vec<String> {
            s["predicate"]["runDetails"]["byproducts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(&sample()), Vec::<String>::new());
        let with_manifest = sample_with_manifest(B);
        assert_eq!(names(&with_manifest), ["tree-manifest", "changed-files"]);
    }

    #[test]
    fn check_table() {
        let good = sample();
        assert!(matches!(check(&good, B), Err(ProvenanceError::Mismatch { .. })));
        let broken = |f: &dyn Fn(&mut Value)| {
            let mut v = good.clone();
            f(&mut v);
            v
        };
        let cases: Vec<(Value, &str)> = vec![
            (broken(&|v| v["_type"] = json!("x")), "_type"),
            (broken(&|v| v["predicateType"] = json!("https://slsa.dev/provenance/v0.2")), "predicateType"),
            (broken(&|v| v["subject"] = json!([])), "0 subjects"),
            (broken(&|v| v["subject"] = json!({})), "not a list"),
            (broken(&|v| v["subject"][0]["digest"] = json!({"sha512": A})), "no sha256"),
            (broken(&|v| v["subject"][0]["digest"]["sha256"] = json!("abc")), "64 hex digits"),
            (broken(&|v| v["predicate"]["runDetails"] = json!(null)), "builder.id"),
            (json!([]), "_type"),
        ];
        for (statement, want) in cases {
            let e = check(&statement, A).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn dates() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (-1, "1969-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(secs), want);
        }
    }
}
