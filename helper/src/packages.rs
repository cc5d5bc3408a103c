//! The 60-InstallPackages task: changes packages with the guest's own tools, offline, in this
//! order: `--update` (from the `--repo` repository alone), the local package files and
//! `--install` (from that repository alone), then `--uninstall`.
//! - Debian/Ubuntu guests: apt-get, pointed at the payload repository only (see [`crate::apt`]);
//!   `--install-deb` files and `--install` names in one `apt-get install`, so that dependencies
//!   among the files, the repository and the installed packages are resolved together.
//! - RPM guests: the `--install-rpm` files in one rpm transaction (dependencies among them
//!   ordered, scriptlets run), then dnf or yum with that repository alone.
//!
//! The payload is bind-mounted read-only into the guest for the duration. In Rust rather than
//! shell so that package names and file names reach the tools as arguments of their own (no
//! globbing, no word splitting, no `sh -c`), and so that the mount point is a directory made and
//! held inside the guest root, not a guest path a shell walks.

use crate::apt;
use crate::confinement::{mount_flags, GuestCommand};
use crate::guest::{CreatedDir, GuestRoot};
use crate::package_manager::{Family, Tools};
use crate::task_env::TaskEnv;
use imgforge_protocol::rules::Rules;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// How many trailing lines of a failed tool's output go into the task's error message.
const MESSAGE_TAIL_LINES: usize = 6;

/// The 60-InstallPackages task.
pub fn run(env: &TaskEnv) -> Result<(), String> {
    let rules_path = env.require("IMGFORGE_RULES")?;
    let text = std::fs::read_to_string(rules_path).map_err(|e| format!("cannot read the rules {rules_path}: {e}"))?;
    let rules = Rules::from_json(&text).map_err(|e| e.to_string())?;
    if !rules.changes_packages() {
        return Ok(());
    }
    let target = env.require("IMGFORGE_TARGET")?;
    let payload = Path::new(env.require("IMGFORGE_PAYLOAD")?);
    let guest = GuestRoot::open(Path::new(target)).map_err(|_| "cannot resolve the guest root".to_string())?;
    let tools = Tools::detect(&guest);
    let family = family_for(&tools, &rules)?;
    println!("package tools: {} ({family:?} packages)", tools.describe());
    guest.mkdir_all("/tmp", 0o1777).map_err(|e| format!("cannot create /tmp in the guest: {e}"))?;
    let inside = format!("/tmp/imgforge-payload.{}", std::process::id());
    let mounted = PayloadMount::new(&guest, payload, &inside)?;
    let result = match family {
        Family::Deb => deb_guest(&guest, &tools, &rules, &inside),
        Family::Rpm => rpm_guest(&guest, &tools, &rules, &inside),
    };
    let unmounted = mounted.remove();
    result.and(unmounted)
}

/// Which kind of package the run changes — what its files or repository are, or else the
/// guest's own kind — checked, before anything runs, against the tools the guest has.
fn family_for(tools: &Tools, rules: &Rules) -> Result<Family, String> {
    let repo = rules.repo.as_ref().map(|_| if rules.repo_format.is_apt() { Family::Deb } else { Family::Rpm });
    let wanted: Vec<(Family, &str)> = [
        (!rules.rpms.is_empty()).then_some((Family::Rpm, "--install-rpm")),
        (!rules.debs.is_empty()).then_some((Family::Deb, "--install-deb")),
        repo.map(|f| (f, if f == Family::Deb { "an apt --repo" } else { "a yum/dnf --repo" })),
    ]
    .into_iter()
    .flatten()
    .collect();
    let family = match wanted.first() {
        Some((family, _)) => *family,
        None => tools.primary()?,
    };
    if let Some((_, other)) = wanted.iter().find(|(f, _)| *f != family) {
        return Err(format!("{} and {other} cannot be given together: one guest, one kind of package", wanted[0].1));
    }
    let has = tools.describe();
    let wants_repo_tool = !rules.install.is_empty() || rules.update;
    match family {
        Family::Deb => {
            if !tools.dpkg {
                return Err(format!("--install-deb and apt repositories need a Debian or Ubuntu guest (dpkg); this guest has {has}: use --install-rpm or a yum/dnf repository"));
            }
            if wants_repo_tool && !tools.apt_get {
                return Err(format!(
                    "--install and --update need apt-get, and this guest has {has}: use --install-deb"
                ));
            }
        }
        Family::Rpm => {
            if !tools.rpm {
                return Err(format!("--install-rpm and yum/dnf repositories need an RPM-based guest (rpm); this guest has {has}: use --install-deb or an apt repository"));
            }
            if wants_repo_tool && tools.dnf_or_yum().is_none() {
                return Err(format!("the guest has neither dnf nor yum: --install and --update need one (this guest has {has}; use --install-rpm)"));
            }
        }
    }
    Ok(family)
}

/// Debian and Ubuntu guests: apt-get (or dpkg alone for files and removals).
fn deb_guest(guest: &GuestRoot, tools: &Tools, rules: &Rules, inside: &str) -> Result<(), String> {
    let files: Vec<String> = rules.debs.iter().map(|f| format!("{inside}/{f}")).collect();
    if !tools.apt_get {
        let scratch = apt::Scratch::new(guest, &format!("/tmp/imgforge-apt.{}", std::process::id()), "")?;
        let result = dpkg_alone(guest, rules, &files);
        return result.and(scratch.remove(guest));
    }
    let sources = match &rules.repo {
        Some(repo) => apt::sources_list(&format!("{inside}/{repo}"), &rules.repo_format, !rules.gpgcheck)?,
        None => String::new(),
    };
    let scratch = apt::Scratch::new(guest, &format!("/tmp/imgforge-apt.{}", std::process::id()), &sources)?;
    let config = scratch.config_path();
    let result = apt_steps(guest, rules, &files, &config);
    result.and(scratch.remove(guest))
}

fn apt_steps(guest: &GuestRoot, rules: &Rules, files: &[String], config: &str) -> Result<(), String> {
    let apt_get = |args: &[&str], what: &str| -> Result<(), String> {
        let mut argv = vec!["apt-get", "-q"];
        argv.extend_from_slice(args);
        println!("{}", argv.join(" "));
        let command = GuestCommand::new(guest, &argv).env("APT_CONFIG", config);
        match logged(command)? {
            Ok(()) => Ok(()),
            Err(out) => {
                let lines: Vec<&str> = out.lines().collect();
                Err(format!("apt-get could not {what}: {}", last_lines(&lines)))
            }
        }
    };
    if rules.repo.is_some() {
        apt_get(&["update"], "read the --repo repository")?;
    }
    if rules.update {
        apt_get(&["upgrade"], "upgrade the guest's packages from the --repo repository")?;
    }
    if !files.is_empty() || !rules.install.is_empty() {
        let mut args = vec!["install"];
        args.extend(files.iter().map(String::as_str));
        args.extend(rules.install.iter().map(String::as_str));
        let mut names: Vec<&str> = rules.debs.iter().map(String::as_str).collect();
        names.extend(rules.install.iter().map(String::as_str));
        apt_get(&args, &format!("install {}", names.join(" ")))?;
    }
    if !rules.uninstall.is_empty() {
        let mut args = vec!["remove"];
        args.extend(rules.uninstall.iter().map(String::as_str));
        apt_get(&args, &format!("remove {}", rules.uninstall.join(" ")))?;
    }
    Ok(())
}

/// A guest with dpkg but no apt-get: `dpkg -i` the files (no dependency resolution), `dpkg -r`.
fn dpkg_alone(guest: &GuestRoot, rules: &Rules, files: &[String]) -> Result<(), String> {
    for (verb, args) in [("-i", files), ("-r", &rules.uninstall[..])] {
        if args.is_empty() {
            continue;
        }
        let mut argv = vec!["dpkg", verb];
        argv.extend(args.iter().map(String::as_str));
        println!("{}", argv.join(" "));
        if let Err(out) = logged(GuestCommand::new(guest, &argv))? {
            let lines: Vec<&str> = out.lines().collect();
            return Err(format!("dpkg {verb} failed: {}", last_lines(&lines)));
        }
    }
    Ok(())
}

/// RPM guests: rpm for files and for removals without dnf or yum, dnf or yum for the rest.
fn rpm_guest(guest: &GuestRoot, tools: &Tools, rules: &Rules, inside: &str) -> Result<(), String> {
    let tool = tools.dnf_or_yum().unwrap_or("rpm");
    let cache = format!("/tmp/imgforge-dnf-cache.{}", std::process::id());
    let result = rpm_steps(guest, tool, rules, inside, &cache);
    let _ = guest.remove_all(&cache);
    result
}

fn rpm_steps(guest: &GuestRoot, tool: &str, rules: &Rules, inside: &str, cache: &str) -> Result<(), String> {
    let repo = rules.repo.as_deref().map(|r| format!("--repofrompath=imgforge,file://{inside}/{r}"));
    // dnf and yum with no repository enabled but the payload's (none for a removal).
    let dnf = |verb: &str, names: &[String], what: String| -> Result<(), String> {
        let mut options = vec!["-y".to_owned(), "--disablerepo=*".to_owned()];
        if let Some(repo) = &repo {
            options.extend([
                repo.clone(),
                "--enablerepo=imgforge".to_owned(),
                format!("--setopt=imgforge.gpgcheck={}", u8::from(rules.gpgcheck)),
            ]);
        }
        options.extend([
            "--setopt=install_weak_deps=False".to_owned(),
            format!("--setopt=cachedir={cache}"),
            verb.to_owned(),
        ]);
        let mut argv: Vec<&str> = vec![tool];
        argv.extend(options.iter().map(String::as_str));
        argv.extend(names.iter().map(String::as_str));
        println!("{tool} {verb} {} (other repositories disabled)", names.join(" "));
        match logged(GuestCommand::new(guest, &argv))? {
            Ok(()) => Ok(()),
            Err(out) => {
                let lines: Vec<&str> = out.lines().collect();
                Err(format!("{tool} could not {what}: {}", last_lines(&lines)))
            }
        }
    };
    if rules.update {
        dnf("upgrade", &[], "upgrade the guest's packages from the --repo repository".into())?;
    }
    if !rules.rpms.is_empty() {
        let files: Vec<String> = rules.rpms.iter().map(|f| format!("{inside}/{f}")).collect();
        println!("rpm -U {}", files.join(" "));
        let mut argv = vec!["rpm", "-U", "--nosignature"];
        argv.extend(files.iter().map(String::as_str));
        if let Err(out) = logged(GuestCommand::new(guest, &argv))? {
            let tail: Vec<&str> = out.lines().filter(|l| !l.contains("use Alien")).collect();
            return Err(format!("rpm refused the transaction: {}", last_lines(&tail)));
        }
    }
    if !rules.install.is_empty() {
        dnf("install", &rules.install, format!("install {}", rules.install.join(" ")))?;
    }
    if !rules.uninstall.is_empty() {
        let names = rules.uninstall.join(" ");
        if tool == "rpm" {
            let mut argv = vec!["rpm", "-e"];
            argv.extend(rules.uninstall.iter().map(String::as_str));
            println!("rpm -e {names}");
            if let Err(out) = logged(GuestCommand::new(guest, &argv))? {
                let lines: Vec<&str> = out.lines().collect();
                return Err(format!("rpm could not remove {names}: {}", last_lines(&lines)));
            }
        } else {
            dnf("remove", &rules.uninstall, format!("remove {names}"))?;
        }
    }
    Ok(())
}

/// Runs a guest program, printing its output into the task log; on failure the output is
/// returned for the error message.
fn logged(command: GuestCommand) -> Result<Result<(), String>, String> {
    let (status, text) = command.combined_output()?;
    for line in text.lines() {
        println!("{line}");
    }
    Ok(if status.success() { Ok(()) } else { Err(text) })
}

fn last_lines(lines: &[&str]) -> String {
    lines[lines.len().saturating_sub(MESSAGE_TAIL_LINES)..].join("\n")
}

/// The payload bind-mounted (read-only: squashfs) on a directory made for it inside the guest.
struct PayloadMount {
    dir: CreatedDir,
    /// The mount's root, held open: unmounted by handle, wherever the guest moved it.
    root: OwnedFd,
}

impl PayloadMount {
    fn new(guest: &GuestRoot, payload: &Path, inside: &str) -> Result<Self, String> {
        let dir = guest.create_dir(inside, 0o700).map_err(|e| format!("cannot create {inside} in the guest: {e}"))?;
        // Onto the directory just made, by handle: nothing of the guest's lies on this path.
        if let Err(e) = mount_flags(payload, &dir.fd_path(), "", libc::MS_BIND, None) {
            let _ = dir.remove();
            return Err(format!("cannot bind-mount the payload on {inside} in the guest: {e}"));
        }
        // No guest program ran since the mount: this is its root.
        match guest.open_path(inside) {
            Ok(root) => Ok(Self { dir, root }),
            Err(e) => Err(format!("cannot open the payload mount {inside} in the guest: {e}")),
        }
    }

    fn remove(self) -> Result<(), String> {
        let path = crate::confinement::path_cstring(Path::new(&format!("/proc/self/fd/{}", self.root.as_raw_fd())));
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(format!("cannot unmount the payload from the guest: {}", std::io::Error::last_os_error()));
        }
        drop(self.root);
        self.dir.remove().map_err(|e| format!("cannot remove the payload's mount point from the guest: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgforge_protocol::rules::RepoFormat;

    #[test]
    fn the_run_chooses_the_kind_of_package_and_the_guest_must_have_its_tools() {
        let debian = Tools { dpkg: true, apt_get: true, ..Tools::default() };
        let debian_with_rpm = Tools { rpm: true, dnf: true, ..debian };
        let fedora = Tools { rpm: true, dnf: true, ..Tools::default() };
        let rules = |f: &dyn Fn(&mut Rules)| {
            let mut r = Rules::new();
            f(&mut r);
            r
        };
        let apt_repo = |r: &mut Rules| {
            r.repo = Some("repo".into());
            r.repo_format = RepoFormat::AptFlat;
            r.install = vec!["a".into()];
        };
        let rpm_repo = |r: &mut Rules| {
            r.repo = Some("repo".into());
            r.install = vec!["a".into()];
        };
        let uninstall = |r: &mut Rules| r.uninstall = vec!["a".into()];
        let debs = |r: &mut Rules| r.debs = vec!["debs/0001-a.deb".into()];
        let rpms = |r: &mut Rules| r.rpms = vec!["rpms/0001-a.rpm".into()];
        let ok: &[(Tools, Rules, Family)] = &[
            (debian, rules(&apt_repo), Family::Deb),
            (debian, rules(&uninstall), Family::Deb),
            (debian, rules(&debs), Family::Deb),
            (debian_with_rpm, rules(&rpms), Family::Rpm),
            (debian_with_rpm, rules(&rpm_repo), Family::Rpm),
            (debian_with_rpm, rules(&uninstall), Family::Deb),
            (fedora, rules(&uninstall), Family::Rpm),
            (Tools { dpkg: true, ..Tools::default() }, rules(&debs), Family::Deb),
        ];
        for (tools, r, want) in ok {
            assert_eq!(family_for(tools, r), Ok(*want), "{tools:?} {r:?}");
        }
        let refused: &[(Tools, Rules, &str)] = &[
            (debian, rules(&rpms), "--install-rpm and yum/dnf repositories need an RPM-based guest"),
            (debian, rules(&rpm_repo), "this guest has dpkg, apt-get: use --install-deb or an apt repository"),
            (Tools { rpm: true, ..debian }, rules(&rpm_repo), "neither dnf nor yum"),
            (fedora, rules(&debs), "need a Debian or Ubuntu guest"),
            (fedora, rules(&apt_repo), "this guest has rpm, dnf"),
            (Tools { dpkg: true, ..Tools::default() }, rules(&apt_repo), "need apt-get"),
            (
                debian_with_rpm,
                rules(&|r| {
                    rpms(r);
                    debs(r)
                }),
                "cannot be given together",
            ),
            (
                debian_with_rpm,
                rules(&|r| {
                    rpms(r);
                    apt_repo(r)
                }),
                "--install-rpm and an apt --repo",
            ),
            (Tools::default(), rules(&uninstall), "neither dpkg"),
        ];
        for (tools, r, want) in refused {
            let err = family_for(tools, r).unwrap_err();
            assert!(err.contains(want), "{tools:?} {r:?}: {err}");
        }
    }
}
