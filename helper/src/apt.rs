//! apt-get in the guest, offline: the configuration that points it at the payload repository
//! alone, keeps its lists and caches in a scratch directory removed afterwards, and keeps
//! maintainer scripts from starting services (a `policy-rc.d`, as debootstrap and snf-image do).
//!
//! The options go in a configuration file named by `APT_CONFIG` rather than on the command
//! line, so that the guest's `/var/log/apt/history.log` records `apt-get install PKG` as
//! virt-customize's run would, not the payload's scratch paths.

use crate::guest::{CreatedDir, GuestRoot};
use imgforge_protocol::rules::{is_apt_source_word, RepoFormat};

/// The hook invoke-rc.d asks before it starts or stops a service; 101 means "not allowed".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const POLICY_RC_D_SCRIPT: &str =
    "#!/bin/sh\n# imgforge: no service starts while packages are installed offline.\nexit 101\n";

/// The `APT_CONFIG` file for a run whose scratch directory is `scratch` (a guest path).
pub fn config(scratch: &str) -> String {
    format!(
        "// imgforge: the payload repository alone; lists and caches in {scratch}, removed afterwards.\n\
         Dir::Etc::SourceList \"{scratch}/sources.list\";\n\
         Dir::Etc::SourceParts \"{scratch}/sources.list.d\";\n\
         Dir::State::Lists \"{scratch}/lists\";\n\
         Dir::Cache::Archives \"{scratch}/archives\";\n\
         Dir::Cache::pkgcache \"\";\n\
         Dir::Cache::srcpkgcache \"\";\n\
         Acquire::Languages \"none\";\n\
         APT::Get::Assume-Yes \"true\";\n\
         Dpkg::Options {{ \"--force-confnew\"; }};\n"
    )
}

/// The sources list for the repository at `dir` (a guest path) of `format`; `trusted` marks it
/// `[trusted=yes]` (signatures not checked: the user's own packages, as without `--gpgcheck`).
pub fn sources_list(dir: &str, format: &RepoFormat, trusted: bool) -> Result<String, String> {
    let options = if trusted { "[trusted=yes] " } else { "" };
    if !dir.starts_with('/') || dir.contains(|c: char| c.is_whitespace() || c == '#' || c == ']') {
        return Err(format!("the repository path {dir:?} cannot stand in a sources list"));
    }
    match format {
        RepoFormat::Rpm => Err("the repository is a yum/dnf repository, not an apt one".into()),
        RepoFormat::AptFlat => Ok(format!("deb {options}file:{dir} ./\n")),
        RepoFormat::AptDists { suites } => {
            if suites.is_empty() {
                return Err("the repository's dists/ holds no suite".into());
            }
            let mut text = String::new();
            for s in suites {
                if let Some(bad) = std::iter::once(&s.suite).chain(&s.components).find(|w| !is_apt_source_word(w)) {
                    return Err(format!("{bad:?} cannot stand as a suite or component in a sources list"));
                }
                if s.components.is_empty() {
                    return Err(format!("suite {} lists no component", s.suite));
                }
                text += &format!("deb {options}file:{dir} {} {}\n", s.suite, s.components.join(" "));
            }
            Ok(text)
        }
    }
}

/// apt's scratch directory and `policy-rc.d` in the guest, for one task run.
pub struct Scratch {
    dir: CreatedDir,
    path: String,
    /// The guest's own `policy-rc.d` (contents and mode), put back afterwards.
    saved_policy: Option<(Vec<u8>, u32)>,
}

impl Scratch {
    /// Makes `path` (a guest path, new) with the configuration and `sources` in it, and puts
    /// the forbidding `policy-rc.d` in place.
    pub fn new(guest: &GuestRoot, path: &str, sources: &str) -> Result<Self, String> {
        let dir = guest.create_dir(path, 0o755).map_err(|e| format!("cannot create {path} in the guest: {e}"))?;
        let fill = || -> std::io::Result<()> {
            for sub in ["lists", "lists/partial", "archives", "archives/partial", "sources.list.d"] {
                guest.mkdir_all(&format!("{path}/{sub}"), 0o755)?;
            }
            guest.write(&format!("{path}/apt.conf"), config(path).as_bytes())?;
            guest.write(&format!("{path}/sources.list"), sources.as_bytes())
        };
        if let Err(e) = fill() {
            let _ = guest.remove_all(path);
            drop(dir);
            return Err(format!("cannot prepare apt's configuration in {path} in the guest: {e}"));
        }
        let saved_policy = guest.open_read(POLICY_RC_D).ok().and_then(|mut f| {
            use std::io::Read;
            use std::os::unix::fs::PermissionsExt;
            let mode = f.metadata().ok().filter(|m| m.is_file())?.permissions().mode() & 0o7777;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).ok().map(|_| (bytes, mode))
        });
        let scratch = Self { dir, path: path.to_owned(), saved_policy };
        let placed = guest
            .create_empty_file(POLICY_RC_D, 0o755)
            .and_then(|()| guest.write(POLICY_RC_D, POLICY_RC_D_SCRIPT.as_bytes()))
            .and_then(|()| guest.chmod(POLICY_RC_D, 0o755));
        if let Err(e) = placed {
            let _ = scratch.remove(guest);
            return Err(format!("cannot write {POLICY_RC_D} in the guest: {e}"));
        }
        Ok(scratch)
    }

    /// The `APT_CONFIG` file (a guest path).
    pub fn config_path(&self) -> String {
        format!("{}/apt.conf", self.path)
    }

    /// Removes the scratch directory and puts the guest's `policy-rc.d` back (or removes ours).
    pub fn remove(self, guest: &GuestRoot) -> Result<(), String> {
        let restored = match &self.saved_policy {
            Some((bytes, mode)) => guest
                .create_empty_file(POLICY_RC_D, *mode)
                .and_then(|()| guest.write(POLICY_RC_D, bytes))
                .and_then(|()| guest.chmod(POLICY_RC_D, *mode)),
            None => guest.remove_all(POLICY_RC_D),
        };
        drop(self.dir);
        let removed = guest.remove_all(&self.path);
        restored.map_err(|e| format!("cannot restore {POLICY_RC_D} in the guest: {e}"))?;
        removed.map_err(|e| format!("cannot remove apt's scratch directory {} from the guest: {e}", self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgforge_protocol::rules::AptSuite;

    #[test]
    fn config_keeps_lists_and_caches_in_the_scratch_directory() {
        let text = config("/tmp/s");
        for want in [
            "Dir::Etc::SourceList \"/tmp/s/sources.list\";",
            "Dir::Etc::SourceParts \"/tmp/s/sources.list.d\";",
            "Dir::State::Lists \"/tmp/s/lists\";",
            "Dir::Cache::Archives \"/tmp/s/archives\";",
            "Dir::Cache::pkgcache \"\";",
            "Acquire::Languages \"none\";",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
    }

    #[test]
    fn sources_lists() {
        let suites = |s: &[(&str, &[&str])]| RepoFormat::AptDists {
            suites: s
                .iter()
                .map(|(suite, comps)| AptSuite {
                    suite: (*suite).into(),
                    components: comps.iter().map(|c| (*c).into()).collect(),
                })
                .collect(),
        };
        let ok: &[(RepoFormat, bool, &str)] = &[
            (RepoFormat::AptFlat, true, "deb [trusted=yes] file:/p/repo ./\n"),
            (RepoFormat::AptFlat, false, "deb file:/p/repo ./\n"),
            (
                suites(&[("bookworm", &["main", "contrib"]), ("bookworm-updates", &["main"])]),
                true,
                "deb [trusted=yes] file:/p/repo bookworm main contrib\ndeb [trusted=yes] file:/p/repo bookworm-updates main\n",
            ),
        ];
        for (format, trusted, want) in ok {
            assert_eq!(sources_list("/p/repo", format, *trusted).as_deref(), Ok(*want));
        }
        let refused: &[(&str, RepoFormat, &str)] = &[
            ("/p/repo", RepoFormat::Rpm, "yum/dnf"),
            ("/p/repo", suites(&[]), "no suite"),
            ("/p/repo", suites(&[("bookworm", &[])]), "no component"),
            ("/p/repo", suites(&[("bookworm main", &["x"])]), "\"bookworm main\""),
            ("/p/repo", suites(&[("ok", &["main\ndeb file:/ x y"])]), "cannot stand"),
            ("/p/my repo", RepoFormat::AptFlat, "cannot stand"),
            ("rel", RepoFormat::AptFlat, "cannot stand"),
        ];
        for (dir, format, want) in refused {
            let err = sources_list(dir, format, true).unwrap_err();
            assert!(err.contains(want), "{dir} {format:?}: {err}");
        }
    }

    #[test]
    fn scratch_is_removed_and_policy_restored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/sbin")).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let guest = GuestRoot::open(dir.path()).unwrap();
        let scratch = Scratch::new(&guest, "/tmp/apt", "deb x ./\n").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("usr/sbin/policy-rc.d")).unwrap(), POLICY_RC_D_SCRIPT);
        assert!(dir.path().join("tmp/apt/lists/partial").is_dir());
        assert_eq!(scratch.config_path(), "/tmp/apt/apt.conf");
        scratch.remove(&guest).unwrap();
        assert!(!dir.path().join("tmp/apt").exists());
        assert!(!dir.path().join("usr/sbin/policy-rc.d").exists(), "none was there before");

        std::fs::write(dir.path().join("usr/sbin/policy-rc.d"), "#!/bin/sh\nexit 0\n").unwrap();
        let scratch = Scratch::new(&guest, "/tmp/apt", "").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("usr/sbin/policy-rc.d")).unwrap(), POLICY_RC_D_SCRIPT);
        scratch.remove(&guest).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("usr/sbin/policy-rc.d")).unwrap(), "#!/bin/sh\nexit 0\n");
    }
}
