//! Recipes for `imgforge build`: one base image, operations in virt-customize's grammar, a
//! matrix of variables expanded into variants, per-variant extra operations, an output format.
//!
//! Parsing and expansion are pure (text in, values out); every error names the recipe line.
//! The build itself (base check, customization, provenance) is [`build`]'s.

pub mod build;
pub mod matrix;
pub mod provenance;

use crate::job::variants::OutputFormat;
use serde::Deserialize;
use std::collections::BTreeMap;
use thiserror::Error;
use toml::Spanned;

/// The recipe format's version, `version` in the file (optional; other values are refused).
pub const RECIPE_VERSION: i64 = 1;

/// What is wrong with a recipe, with the line it is on.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{file}:{line}: {message}")]
pub struct RecipeError {
    /// The recipe as given.
    pub file: String,
    /// 1-based line (0: the file as a whole).
    pub line: usize,
    /// What is wrong and what to do.
    pub message: String,
}

/// One operation line of a recipe, as written (or after substitution).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeOp {
    /// The recipe line it is on.
    pub line: usize,
    /// `NAME ARG` as in a `--commands-from-file` line (`hostname web-{site}`).
    pub text: String,
}

/// Extra operations for the variants whose variables match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantRule {
    /// The recipe line of the rule.
    pub line: usize,
    /// Variable = value pairs that must all hold.
    pub matches: Vec<(String, String)>,
    /// Operations after the common ones.
    pub operations: Vec<RecipeOp>,
}

/// A parsed recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// The base image: a path (relative to the recipe's directory) or an http(s) URL.
    pub base_image: String,
    /// Its SHA-256 (lowercase hex), checked before any variant is made.
    pub base_sha256: String,
    /// The outputs' format.
    pub format: OutputFormat,
    /// The output file name pattern (`{site}-{role}.img`), in `--out-dir`.
    pub output: RecipeOp,
    /// The variant name pattern (default: the matrix values joined with `-`).
    pub name: Option<RecipeOp>,
    /// The operations every variant gets, in order.
    pub operations: Vec<RecipeOp>,
    /// Variables and their values, in file order.
    pub matrix: Vec<(String, Vec<String>)>,
    /// Per-variant extra operations.
    pub rules: Vec<VariantRule>,
    /// The seed random choices derive from (`--seed` wins).
    pub seed: Option<String>,
    /// `SOURCE_DATE_EPOCH` for the files imgforge writes (the environment's when absent).
    pub source_date_epoch: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    version: Option<Spanned<i64>>,
    base: Spanned<RawBase>,
    format: Option<Spanned<String>>,
    output: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    #[serde(default)]
    operations: Vec<Spanned<String>>,
    #[serde(default)]
    matrix: BTreeMap<Spanned<String>, Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    variant: Vec<Spanned<RawVariant>>,
    seed: Option<Spanned<String>>,
    source_date_epoch: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    image: Spanned<String>,
    sha256: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    #[serde(rename = "match")]
    matches: Spanned<BTreeMap<Spanned<String>, Spanned<String>>>,
    #[serde(default)]
    operations: Vec<Spanned<String>>,
}

/// The 1-based line of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// True for a name made of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Parses the recipe `text` read from `file` (named in errors).
pub fn parse(file: &str, text: &str) -> Result<Recipe, RecipeError> {
    let err = |line: usize, message: String| RecipeError { file: file.to_owned(), line, message };
    let at = |span: std::ops::Range<usize>| line_of(text, span.start);
    let raw: RawRecipe = toml::from_str(text).map_err(|e| {
        let line = e.span().map(&at).unwrap_or(0);
        err(line, e.message().trim().to_owned())
    })?;
    if let Some(v) = &raw.version {
        if *v.get_ref() != RECIPE_VERSION {
            return Err(err(
                at(v.span()),
                format!("version {} is not one imgforge reads (use {RECIPE_VERSION})", v.get_ref()),
            ));
        }
    }
    let ops = |list: &[Spanned<String>]| -> Vec<RecipeOp> {
        list.iter().map(|o| RecipeOp { line: at(o.span()), text: o.get_ref().clone() }).collect()
    };
    let base = raw.base.get_ref();
    let base_sha256 = crate::job::write::check_sha256_arg(base.sha256.get_ref())
        .map_err(|e| err(at(base.sha256.span()), format!("base.sha256: {e}")))?;
    if base.image.get_ref().trim().is_empty() {
        return Err(err(at(base.image.span()), "base.image is empty: give a path or an http(s) URL".into()));
    }
    let format = match &raw.format {
        None => OutputFormat::Raw,
        Some(f) => match f.get_ref().as_str() {
            "raw" => OutputFormat::Raw,
            "qcow2" => OutputFormat::Qcow2,
            "qcow2-backed" => OutputFormat::Qcow2Backed,
            other => {
                return Err(err(at(f.span()), format!("format {other:?}: use raw, qcow2 or qcow2-backed")));
            }
        },
    };
    let mut matrix = Vec::new();
    let mut count = 1usize;
    // Variables in the order the file gives them (names and loops follow it).
    let mut entries: Vec<_> = raw.matrix.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    for (key, values) in entries {
        let line = at(key.span());
        let name = key.get_ref();
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || name.is_empty() || name == "variant" {
            return Err(err(line, format!("matrix variable {name:?}: use letters, digits and '_' (not \"variant\")")));
        }
        if values.get_ref().is_empty() {
            return Err(err(line, format!("matrix variable {name:?} has no values")));
        }
        let mut seen = Vec::new();
        for v in values.get_ref() {
            let value = v.get_ref();
            if !is_plain_name(value) {
                return Err(err(
                    at(v.span()),
                    format!("matrix value {value:?}: use letters, digits, '.', '_' and '-' (it goes into file names)"),
                ));
            }
            if seen.contains(value) {
                return Err(err(at(v.span()), format!("matrix value {value:?} is given twice for {name}")));
            }
            seen.push(value.clone());
        }
        // Refused here, at the variable that crosses the bound, before anything is expanded.
        match count.checked_mul(seen.len()).filter(|n| *n <= matrix::MAX_VARIANTS) {
            Some(n) => count = n,
            None => {
                return Err(err(
                    line,
                    format!(
                        "matrix variable {name:?} takes the matrix past {} variants, the most a build makes: split the recipe",
                        matrix::MAX_VARIANTS
                    ),
                ));
            }
        }
        matrix.push((name.clone(), seen));
    }
    let mut rules = Vec::new();
    for v in &raw.variant {
        let line = at(v.span());
        let mut matches = Vec::new();
        for (key, value) in v.get_ref().matches.get_ref() {
            let Some((_, values)) = matrix.iter().find(|(k, _)| k == key.get_ref()) else {
                return Err(err(
                    at(key.span()),
                    format!("[[variant]] match names {:?}, which is not a matrix variable", key.get_ref()),
                ));
            };
            if !values.contains(value.get_ref()) {
                return Err(err(
                    at(value.span()),
                    format!(
                        "[[variant]] match {} = {:?} matches no variant (values: {})",
                        key.get_ref(),
                        value.get_ref(),
                        values.join(", ")
                    ),
                ));
            }
            matches.push((key.get_ref().clone(), value.get_ref().clone()));
        }
        if matches.is_empty() {
            return Err(err(line, "[[variant]] needs match = { VARIABLE = \"VALUE\", ... }".into()));
        }
        rules.push(VariantRule { line, matches, operations: ops(&v.get_ref().operations) });
    }
    let default_output = match format {
        OutputFormat::Raw => "{variant}.img",
        OutputFormat::Qcow2 | OutputFormat::Qcow2Backed => "{variant}.qcow2",
    };
    let output = match &raw.output {
        Some(o) => RecipeOp { line: at(o.span()), text: o.get_ref().clone() },
        None => RecipeOp { line: 0, text: default_output.into() },
    };
    Ok(Recipe {
        base_image: base.image.get_ref().clone(),
        base_sha256,
        format,
        output,
        name: raw.name.as_ref().map(|n| RecipeOp { line: at(n.span()), text: n.get_ref().clone() }),
        operations: ops(&raw.operations),
        matrix,
        rules,
        seed: raw.seed.map(Spanned::into_inner),
        source_date_epoch: raw.source_date_epoch.map(Spanned::into_inner),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn recipe(body: &str) -> String {
        format!("{body}\n[base]\nimage = \"base.img\"\nsha256 = \"{SHA}\"\n")
    }

    #[test]
    fn a_full_recipe_parses() {
        let text = format!(
            "version = 1\nformat = \"qcow2\"\noutput = \"{{site}}-{{role}}.qcow2\"\nseed = \"s\"\nsource_date_epoch = 1700000000\n\
             operations = [\n  \"hostname {{site}}-{{role}}\",\n  \"write /etc/site:{{site}}\",\n]\n\
             [base]\nimage = \"https://example.org/d.img\"\nsha256 = \"{}\"\n\
             [matrix]\nsite = [\"ath\", \"ber\"]\nrole = [\"web\", \"db\"]\n\
             [[variant]]\nmatch = {{ site = \"ath\" }}\noperations = [\"touch /ath\"]\n",
            SHA.to_uppercase()
        );
        let r = parse("r.toml", &text).unwrap();
        assert_eq!(r.base_image, "https://example.org/d.img");
        assert_eq!(r.base_sha256, SHA);
        assert_eq!(r.format, OutputFormat::Qcow2);
        assert_eq!(r.output, RecipeOp { line: 3, text: "{site}-{role}.qcow2".into() });
        assert_eq!(r.operations[1], RecipeOp { line: 8, text: "write /etc/site:{site}".into() });
        // Variables in file order.
        assert_eq!(
            r.matrix,
            vec![("site".into(), vec!["ath".into(), "ber".into()]), ("role".into(), vec!["web".into(), "db".into()])]
        );
        assert_eq!(r.rules[0].matches, vec![("site".into(), "ath".into())]);
        assert_eq!(r.rules[0].operations, vec![RecipeOp { line: 18, text: "touch /ath".into() }]);
        assert_eq!((r.seed.as_deref(), r.source_date_epoch), (Some("s"), Some(1_700_000_000)));
        let bare = parse("r.toml", &recipe("")).unwrap();
        assert_eq!((bare.format, bare.output.text.as_str()), (OutputFormat::Raw, "{variant}.img"));
    }

    /// Each refused recipe names its line and what is wrong.
    #[test]
    fn errors_name_the_line_table() {
        let cases: &[(String, usize, &str)] = &[
            (recipe("format = \"vmdk\"\n"), 1, "raw, qcow2 or qcow2-backed"),
            (recipe("colour = 1\n"), 1, "unknown field `colour`"),
            (recipe("operations = [\"hostname a\",\n 3]\n"), 2, "invalid type"),
            (recipe("[matrix]\nsite = []\n"), 2, "has no values"),
            (recipe("[matrix]\nsite = [\"a/b\"]\n"), 2, "file names"),
            (recipe("[matrix]\nsite = [\"a\", \"a\"]\n"), 2, "twice"),
            (recipe("[matrix]\nvariant = [\"a\"]\n"), 2, "not \"variant\""),
            (recipe("[matrix]\nsite = [\"a\"]\n[[variant]]\nmatch = { role = \"x\" }\n"), 4, "not a matrix variable"),
            (recipe("[matrix]\nsite = [\"a\"]\n[[variant]]\nmatch = { site = \"b\" }\n"), 4, "matches no variant"),
            (recipe("version = 2\n"), 1, "version 2"),
            ("[base]\nimage = \"b\"\nsha256 = \"abc\"\n".into(), 3, "64 hex digits"),
            ("[base]\nimage = \"b\"\n".into(), 1, "missing field `sha256`"),
            ("format = \"raw\"\n".into(), 1, "missing field `base`"),
            (recipe("seed = \"x\"\nseed = \"y\"\n"), 2, "duplicate key"),
        ];
        for (text, line, want) in cases {
            let e = parse("r.toml", text).unwrap_err();
            assert!(e.message.contains(want), "{text}: {e}");
            assert_eq!(e.line, *line, "{text}: {e}");
            assert!(e.to_string().starts_with(&format!("r.toml:{line}: ")), "{e}");
        }
    }

    #[test]
    fn plain_names() {
        for ok in ["ath", "a-1", "web_2.x"] {
            assert!(is_plain_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "ä"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }

    const SCHEMA: &str = include_str!("../../../docs/recipe-v1.schema.json");
    const EXAMPLE: &str = include_str!("../../../docs/examples/sites.toml");

    fn schema_errors(text: &str) -> Vec<String> {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
        let validator = jsonschema::draft202012::new(&schema).unwrap();
        let value: serde_json::Value = toml::from_str(text).unwrap();
        validator.iter_errors(&value).map(|e| e.to_string()).collect()
    }

    /// The published schema and the parser agree: the example and these recipes pass both;
    /// the broken ones fail both.
    #[test]
    fn the_schema_matches_the_parser() {
        let good = [
            EXAMPLE.to_owned(),
            recipe(""),
            recipe("format = \"qcow2-backed\"\noperations = [\"selinux-relabel\", \"hostname a\"]\n[matrix]\nx = [\"1\"]\n"),
        ];
        for text in &good {
            assert_eq!(schema_errors(text), Vec::<String>::new(), "{text}");
            let r = parse("r.toml", text).unwrap_or_else(|e| panic!("{text}: {e}"));
            matrix::expand(&r, "r.toml").unwrap();
        }
        let example = parse("sites.toml", EXAMPLE).unwrap();
        assert_eq!(matrix::expand(&example, "sites.toml").unwrap().len(), 4);
        let bad = [
            recipe("format = \"vmdk\"\n"),
            recipe("colour = 1\n"),
            recipe("[matrix]\nsite = []\n"),
            recipe("[matrix]\nsite = [\"a/b\"]\n"),
            recipe("[matrix]\nvariant = [\"a\"]\n"),
            recipe("[[variant]]\noperations = []\n"),
            recipe("version = 2\n"),
            "[base]\nimage = \"b\"\nsha256 = \"abc\"\n".into(),
            "[base]\nimage = \"b\"\n".into(),
        ];
        for text in &bad {
            assert!(!schema_errors(text).is_empty(), "the schema accepts {text}");
            assert!(parse("r.toml", text).is_err(), "the parser accepts {text}");
        }
    }
}
