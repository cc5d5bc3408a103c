//! `--repo DIR`: what kind of repository a host directory is, and the files that carry it on
//! the payload disk — a yum/dnf repository (`repodata/repomd.xml`), a flat apt repository
//! (`Packages` at its top), an apt repository with `dists/` and a pool, or a plain directory of
//! `.deb` files, for which the index is written here (see [`crate::ops::deb`]).

use crate::ops::deb::{packages_index, release_file, IndexEntry};
use crate::ops::PayloadFile;
use imgforge_protocol::rules::{is_apt_source_word, AptSuite, RepoFormat};
use std::path::{Path, PathBuf};

/// The payload directory the repository goes into.
pub const PAYLOAD_DIR: &str = "repo";
/// The index files of a flat apt repository, any one of which makes it one.
const FLAT_INDEXES: [&str; 4] = ["Packages", "Packages.gz", "Packages.xz", "Packages.zst"];

/// A `--repo` directory, classified.
#[derive(Debug)]
pub struct Repo {
    /// Its layout.
    pub format: RepoFormat,
    /// Its files for the payload disk.
    pub files: Vec<PayloadFile>,
    /// Whether apt can check its signatures (`InRelease` or `Release.gpg` for each index).
    pub signed: bool,
    /// The index imgforge wrote for a directory of `.deb` files (held until the run ends).
    pub generated: Option<tempfile::TempDir>,
}

/// Reads the directory `dir` (as given on the command line: `shown`).
pub fn classify(dir: &Path, shown: &str) -> Result<Repo, String> {
    if !dir.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    let files = super::files_under(dir)?;
    let whole = |files: &[PathBuf]| -> Vec<PayloadFile> {
        files
            .iter()
            .map(|rel| PayloadFile {
                name: format!("{PAYLOAD_DIR}/{}", rel.display()),
                source: dir.join(rel),
                tree: None,
            })
            .collect()
    };
    let has = |name: &str| files.iter().any(|f| f == Path::new(name));
    let signed_at = |prefix: &str| has(&format!("{prefix}InRelease")) || has(&format!("{prefix}Release.gpg"));
    if has("repodata/repomd.xml") {
        return Ok(Repo { format: RepoFormat::Rpm, files: whole(&files), signed: true, generated: None });
    }
    if FLAT_INDEXES.iter().any(|i| has(i)) {
        return Ok(Repo { format: RepoFormat::AptFlat, files: whole(&files), signed: signed_at(""), generated: None });
    }
    if dir.join("dists").is_dir() {
        let suites = dists_suites(dir, &files).map_err(|e| format!("{shown}: {e}"))?;
        let signed = suites.iter().all(|s| signed_at(&format!("dists/{}/", s.suite)));
        return Ok(Repo { format: RepoFormat::AptDists { suites }, files: whole(&files), signed, generated: None });
    }
    let debs: Vec<&PathBuf> = files.iter().filter(|f| f.extension().is_some_and(|e| e == "deb")).collect();
    if debs.is_empty() {
        return Err(format!(
            "{shown} is not a package repository: give a yum/dnf repository (repodata/repomd.xml: run \
             createrepo_c on it), an apt repository (Packages at its top, or dists/), or a directory of \
             .deb files"
        ));
    }
    let mut entries = Vec::new();
    let mut payload = Vec::new();
    for rel in debs {
        let filename = rel.to_str().filter(|f| !f.contains(char::is_whitespace)).ok_or_else(|| {
            format!("{shown}: {} has a name apt cannot carry in an index (not UTF-8, or a space)", rel.display())
        })?;
        entries.push(IndexEntry::read(&dir.join(rel), filename)?);
        payload.push(PayloadFile { name: format!("{PAYLOAD_DIR}/{filename}"), source: dir.join(rel), tree: None });
    }
    let index = packages_index(&entries);
    let scratch = tempfile::Builder::new()
        .prefix("imgforge-apt-index.")
        .tempdir()
        .map_err(|e| format!("cannot make a directory for the index of {shown}: {e}"))?;
    for (name, text) in [("Packages", index.clone()), ("Release", release_file(index.as_bytes()))] {
        let path = scratch.path().join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write the index of {shown}: {e}"))?;
        payload.push(PayloadFile { name: format!("{PAYLOAD_DIR}/{name}"), source: path, tree: None });
    }
    Ok(Repo { format: RepoFormat::AptFlat, files: payload, signed: false, generated: Some(scratch) })
}

/// The suites of `dists/`: every directory under it with a `Release` or `InRelease`, with
/// the components that file lists.
fn dists_suites(dir: &Path, files: &[PathBuf]) -> Result<Vec<AptSuite>, String> {
    let mut suites: Vec<AptSuite> = Vec::new();
    for rel in files {
        let Ok(under) = rel.strip_prefix("dists") else { continue };
        let name = under.file_name().and_then(|n| n.to_str());
        if !matches!(name, Some("Release" | "InRelease")) {
            continue;
        }
        let suite = under.parent().and_then(Path::to_str).unwrap_or_default().to_owned();
        if suites.iter().any(|s| s.suite == suite) {
            continue;
        }
        let text = std::fs::read_to_string(dir.join(rel)).map_err(|e| format!("cannot read {}: {e}", rel.display()))?;
        let components = release_components(&text).map_err(|e| format!("{}: {e}", rel.display()))?;
        if !is_apt_source_word(&suite) {
            return Err(format!("suite {suite:?} under dists/ is not a name apt can be given"));
        }
        suites.push(AptSuite { suite, components });
    }
    if suites.is_empty() {
        return Err("dists/ holds no suite with a Release or InRelease file".into());
    }
    Ok(suites)
}

/// The `Components:` of a `Release` file (or of the message of a clearsigned `InRelease`).
pub fn release_components(text: &str) -> Result<Vec<String>, String> {
    let message = match text.strip_prefix("-----BEGIN PGP SIGNED MESSAGE-----\n") {
        // The armor headers end at the first blank line; the signature starts after the message.
        Some(signed) => {
            let body = signed.split_once("\n\n").map(|(_, b)| b).unwrap_or_default();
            body.split("\n-----BEGIN PGP SIGNATURE-----").next().unwrap_or_default()
        }
        None => text,
    };
    let line = message
        .lines()
        .find_map(|l| l.strip_prefix("Components:"))
        .ok_or("it has no Components: field (a flat repository has Packages at its top instead)")?;
    let components: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    if components.is_empty() {
        return Err("its Components: field is empty".into());
    }
    if let Some(bad) = components.iter().find(|c| !is_apt_source_word(c)) {
        return Err(format!("component {bad:?} is not a name apt can be given"));
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_components_parse() {
        let plain = "Origin: Debian\nSuite: stable\nCodename: bookworm\nComponents: main contrib non-free-firmware\nSHA256:\n x 1 main/binary-amd64/Packages\n";
        assert_eq!(release_components(plain).unwrap(), ["main", "contrib", "non-free-firmware"]);
        let signed = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nSuite: stable\nComponents: main\n-----BEGIN PGP SIGNATURE-----\n\nComponents: evil\n-----END PGP SIGNATURE-----\n";
        assert_eq!(release_components(signed).unwrap(), ["main"]);
        for (text, want) in [
            ("Suite: x\n", "no Components"),
            ("Components:   \n", "empty"),
            ("Components: main ../x\n", "\"../x\""),
            ("Components: ma]in\n", "\"ma]in\""),
        ] {
            let err = release_components(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn directories_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, files: &[(&str, &str)]| {
            let d = dir.path().join(name);
            for (f, text) in files {
                std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
                std::fs::write(d.join(f), text).unwrap();
            }
            d
        };
        let rpm = classify(&make("rpm", &[("repodata/repomd.xml", ""), ("a.rpm", "")]), "rpm").unwrap();
        assert_eq!((rpm.format, rpm.files.len()), (RepoFormat::Rpm, 2));
        let flat = classify(&make("flat", &[("Packages.xz", ""), ("a.deb", "")]), "flat").unwrap();
        assert_eq!((flat.format, flat.signed, flat.files.len()), (RepoFormat::AptFlat, false, 2));
        let signed = classify(&make("signed", &[("Packages", ""), ("InRelease", "")]), "signed").unwrap();
        assert!(signed.signed);
        let pool = classify(
            &make(
                "pool",
                &[
                    ("dists/bookworm/Release", "Components: main\n"),
                    ("dists/bookworm/Release.gpg", ""),
                    ("dists/bookworm/main/binary-amd64/Packages", ""),
                    ("pool/main/a/a.deb", ""),
                ],
            ),
            "pool",
        )
        .unwrap();
        assert_eq!(
            pool.format,
            RepoFormat::AptDists {
                suites: vec![AptSuite { suite: "bookworm".into(), components: vec!["main".into()] }]
            }
        );
        assert!(pool.signed && pool.files.iter().all(|f| f.name.starts_with("repo/")));
        let refused: &[(PathBuf, &str)] = &[
            (make("empty", &[("README", "")]), "not a package repository"),
            (dir.path().join("missing"), "not a directory"),
            (make("nodists", &[("dists/x/y", "")]), "no suite"),
            (make("bad-deb", &[("x.deb", "not a deb")]), "!<arch>"),
            (make("bad-suite", &[("dists/a b/Release", "Components: main\n")]), "\"a b\""),
        ];
        for (path, want) in refused {
            let err = classify(path, "DIR").unwrap_err();
            assert!(err.contains(want), "{}: {err}", path.display());
        }
    }
}
