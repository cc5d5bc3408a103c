//! Which package manager a guest uses, told from the programs and databases in its root, and
//! the first-boot script that installs packages with it (`--firstboot-install`).

use crate::guest::GuestRoot;

/// Where the guest's programs look for tools, as a login shell's PATH would have it.
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];
/// dpkg's database: present and not empty on a Debian or Ubuntu guest (an RPM guest that
/// merely ships the dpkg program has none).
const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// The package tools a guest has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tools {
    /// dpkg with its database (a Debian or Ubuntu guest).
    pub dpkg: bool,
    /// apt-get.
    pub apt_get: bool,
    /// rpm.
    pub rpm: bool,
    /// dnf.
    pub dnf: bool,
    /// yum.
    pub yum: bool,
}

/// The two kinds of package a guest's tools install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `.deb`: dpkg and apt-get.
    Deb,
    /// `.rpm`: rpm, dnf and yum.
    Rpm,
}

impl Tools {
    /// What the guest has where its programs look for tools.
    pub fn detect(guest: &GuestRoot) -> Self {
        let has = |tool: &str| TOOL_DIRS.iter().any(|dir| guest.is_executable(&format!("{dir}/{tool}")));
        let dpkg_db = guest.open_read(DPKG_STATUS).and_then(|f| f.metadata()).is_ok_and(|m| m.is_file() && m.len() > 0);
        Self {
            dpkg: has("dpkg") && dpkg_db,
            apt_get: has("apt-get"),
            rpm: has("rpm"),
            dnf: has("dnf"),
            yum: has("yum"),
        }
    }

    /// The guest's own family: Debian's when it has dpkg and its database (whatever else it
    /// carries), RPM's when it has rpm.
    pub fn primary(&self) -> Result<Family, String> {
        if self.dpkg {
            Ok(Family::Deb)
        } else if self.rpm {
            Ok(Family::Rpm)
        } else {
            Err(format!("the guest has {}: imgforge changes packages only with the guest's own tools", self.describe()))
        }
    }

    /// What it has, for messages.
    pub fn describe(&self) -> String {
        let found: Vec<&str> =
            [(self.dpkg, "dpkg"), (self.apt_get, "apt-get"), (self.rpm, "rpm"), (self.dnf, "dnf"), (self.yum, "yum")]
                .iter()
                .filter(|(has, _)| *has)
                .map(|(_, name)| *name)
                .collect();
        if found.is_empty() {
            "neither dpkg (with its database, /var/lib/dpkg/status) nor rpm".into()
        } else {
            found.join(", ")
        }
    }

    /// dnf, else yum: the RPM tool that resolves dependencies from a repository.
    pub fn dnf_or_yum(&self) -> Option<&'static str> {
        if self.dnf {
            Some("dnf")
        } else if self.yum {
            Some("yum")
        } else {
            None
        }
    }
}

/// The first-boot script of `--firstboot-install`: the guest's package manager installs
/// `packages` from the guest's own repositories (it has a network then), as virt-customize's
/// does. Each name is single-quoted: `*` stays the package manager's pattern.
pub fn firstboot_install_script(tools: &Tools, packages: &[String]) -> Result<String, String> {
    if let Some(bad) = packages.iter().find(|p| p.is_empty() || p.contains(['\'', '\n', '\0'])) {
        return Err(format!("{bad:?} is not a package name"));
    }
    let names: Vec<String> = packages.iter().map(|p| format!("'{p}'")).collect();
    let names = names.join(" ");
    match tools.primary()? {
        Family::Deb if tools.apt_get => Ok(format!(
            "#!/bin/sh\n# imgforge --firstboot-install\nexport DEBIAN_FRONTEND=noninteractive\n\
             apt_opts='-q -y -o Dpkg::Options::=--force-confnew'\n\
             apt-get $apt_opts update\napt-get $apt_opts install {names}\n"
        )),
        Family::Rpm if tools.dnf_or_yum().is_some() => {
            let tool = tools.dnf_or_yum().unwrap_or_default();
            Ok(format!("#!/bin/sh\n# imgforge --firstboot-install\n{tool} -y install {names}\n"))
        }
        _ => Err(format!("--firstboot-install needs apt-get, dnf or yum in the guest, which has {}", tools.describe())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn guest_with(files: &[(&str, &str)]) -> (tempfile::TempDir, GuestRoot) {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = dir.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            if path.contains("bin/") {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        let g = GuestRoot::open(dir.path()).unwrap();
        (dir, g)
    }

    #[test]
    fn detection_reads_programs_and_the_dpkg_database() {
        let status = "Package: base-files\nStatus: install ok installed\n";
        let apt = Tools { dpkg: true, apt_get: true, ..Tools::default() };
        /// Guest files (path, contents), the tools found, the family.
        type Case<'a> = (&'a [(&'a str, &'a str)], Tools, Option<Family>);
        let cases: &[Case] = &[
            (&[("/usr/bin/dpkg", "x"), ("/usr/bin/apt-get", "x"), (DPKG_STATUS, status)], apt, Some(Family::Deb)),
            (
                &[("/usr/bin/dpkg", "x"), (DPKG_STATUS, status)],
                Tools { dpkg: true, ..Tools::default() },
                Some(Family::Deb),
            ),
            (
                &[("/usr/bin/rpm", "x"), ("/usr/bin/dnf", "x")],
                Tools { rpm: true, dnf: true, ..Tools::default() },
                Some(Family::Rpm),
            ),
            (
                &[("/bin/rpm", "x"), ("/usr/bin/yum", "x")],
                Tools { rpm: true, yum: true, ..Tools::default() },
                Some(Family::Rpm),
            ),
            // Fedora ships a dpkg program, without a database: still an RPM guest.
            (
                &[("/usr/bin/dpkg", "x"), ("/usr/bin/rpm", "x")],
                Tools { rpm: true, ..Tools::default() },
                Some(Family::Rpm),
            ),
            // A Debian guest that also carries rpm is Debian's first.
            (
                &[("/usr/bin/dpkg", "x"), ("/usr/bin/rpm", "x"), (DPKG_STATUS, status)],
                Tools { dpkg: true, rpm: true, ..Tools::default() },
                Some(Family::Deb),
            ),
            (&[("/usr/bin/dpkg", "x"), (DPKG_STATUS, "")], Tools::default(), None),
            (&[("/usr/bin/apt-get", "x")], Tools { apt_get: true, ..Tools::default() }, None),
            (&[("/etc/os-release", "ID=alpine\n")], Tools::default(), None),
        ];
        for (files, want_tools, want) in cases {
            let (_dir, guest) = guest_with(files);
            let tools = Tools::detect(&guest);
            assert_eq!(tools, *want_tools, "{files:?}");
            match (tools.primary(), want) {
                (Ok(found), Some(want)) => assert_eq!(found, *want, "{files:?}"),
                (Err(e), None) => assert!(e.contains("nor rpm") || e.contains("has apt-get:"), "{e}"),
                (other, _) => panic!("{files:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn firstboot_scripts_quote_each_name() {
        let names = vec!["vim".to_owned(), "lib*".to_owned()];
        let apt = Tools { dpkg: true, apt_get: true, ..Tools::default() };
        let script = firstboot_install_script(&apt, &names).unwrap();
        assert!(
            script.contains("apt-get $apt_opts update\n") && script.ends_with("install 'vim' 'lib*'\n"),
            "{script}"
        );
        assert!(script.contains("DEBIAN_FRONTEND=noninteractive"));
        let dnf = Tools { rpm: true, dnf: true, yum: true, ..Tools::default() };
        assert!(firstboot_install_script(&dnf, &names).unwrap().ends_with("dnf -y install 'vim' 'lib*'\n"));
        let yum = Tools { rpm: true, yum: true, ..Tools::default() };
        assert!(firstboot_install_script(&yum, &names).unwrap().contains("yum -y install"));
        let rpm = Tools { rpm: true, ..Tools::default() };
        assert!(firstboot_install_script(&rpm, &names).unwrap_err().contains("which has rpm"));
        assert!(firstboot_install_script(&apt, &["a'b".to_owned()]).is_err());
    }
}
