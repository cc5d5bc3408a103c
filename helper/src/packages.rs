//! The 60-InstallPackages task: installs packages with the guest's own tools, offline — the
//! `--install-rpm` files in one rpm transaction (dependencies among them ordered, scriptlets
//! run), then `--install` from the `--repo` repository alone with dnf or yum. The payload is
//! bind-mounted read-only into the guest for the duration.
//!
//! In Rust rather than shell so that package names and file names reach rpm and dnf as
//! arguments of their own (no globbing, no word splitting, no `sh -c`), and so that the mount
//! point is a directory made and held inside the guest root, not a guest path a shell walks.

use crate::confinement::{mount_flags, GuestCommand};
use crate::guest::{CreatedDir, GuestRoot};
use crate::task_env::TaskEnv;
use imgforge_protocol::rules::Rules;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// How many trailing lines of a failed tool's output go into the task's error message.
const MESSAGE_TAIL_LINES: usize = 6;
/// Where the guest's programs look for tools, as a login shell's PATH would have it.
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// The 60-InstallPackages task.
pub fn run(env: &TaskEnv) -> Result<(), String> {
    let rules_path = env.require("IMGFORGE_RULES")?;
    let text = std::fs::read_to_string(rules_path).map_err(|e| format!("cannot read the rules {rules_path}: {e}"))?;
    let rules = Rules::from_json(&text).map_err(|e| e.to_string())?;
    if rules.rpms.is_empty() && rules.install.is_empty() {
        return Ok(());
    }
    let target = env.require("IMGFORGE_TARGET")?;
    let payload = Path::new(env.require("IMGFORGE_PAYLOAD")?);
    let guest = GuestRoot::open(Path::new(target)).map_err(|_| "cannot resolve the guest root".to_string())?;
    guest.mkdir_all("/tmp", 0o1777).map_err(|e| format!("cannot create /tmp in the guest: {e}"))?;
    let inside = format!("/tmp/imgforge-payload.{}", std::process::id());
    let mounted = PayloadMount::new(&guest, payload, &inside)?;
    let result = install(&guest, &rules, &inside);
    let unmounted = mounted.remove();
    result.and(unmounted)
}

fn install(guest: &GuestRoot, rules: &Rules, inside: &str) -> Result<(), String> {
    if !rules.rpms.is_empty() {
        if !has(guest, "rpm") {
            return Err("the guest has no rpm: --install-rpm needs an RPM-based guest".into());
        }
        let files: Vec<String> = rules.rpms.iter().map(|f| format!("{inside}/{f}")).collect();
        println!("rpm -U {}", files.join(" "));
        let mut argv = vec!["rpm", "-U", "--nosignature"];
        argv.extend(files.iter().map(String::as_str));
        let out = run_logged(guest, &argv)?;
        if let Err(out) = out {
            let tail: Vec<&str> = out.lines().filter(|l| !l.contains("use Alien")).collect();
            return Err(format!("rpm refused the transaction: {}", last_lines(&tail)));
        }
    }
    if !rules.install.is_empty() {
        let tool = if has(guest, "dnf") {
            "dnf"
        } else if has(guest, "yum") {
            "yum"
        } else {
            return Err("the guest has neither dnf nor yum: --install needs one (or use --install-rpm)".into());
        };
        let names = rules.install.join(" ");
        let repo = rules.repo.as_deref().unwrap_or_default();
        println!("{tool} install {names} from {repo} (other repositories disabled)");
        let cache = format!("/tmp/imgforge-dnf-cache.{}", std::process::id());
        let options = [
            "-y".to_owned(),
            "--disablerepo=*".to_owned(),
            format!("--repofrompath=imgforge,file://{inside}/{repo}"),
            "--enablerepo=imgforge".to_owned(),
            format!("--setopt=imgforge.gpgcheck={}", u8::from(rules.gpgcheck)),
            "--setopt=install_weak_deps=False".to_owned(),
            format!("--setopt=cachedir={cache}"),
            "install".to_owned(),
        ];
        let mut argv: Vec<&str> = vec![tool];
        argv.extend(options.iter().map(String::as_str));
        argv.extend(rules.install.iter().map(String::as_str));
        let out = run_logged(guest, &argv)?;
        let _ = guest.remove_all(&cache);
        if let Err(out) = out {
            let lines: Vec<&str> = out.lines().collect();
            return Err(format!("{tool} could not install {names}: {}", last_lines(&lines)));
        }
    }
    Ok(())
}

/// Whether the guest has `tool` where its programs look for it (what `command -v` tells,
/// without starting the guest's shell).
fn has(guest: &GuestRoot, tool: &str) -> bool {
    TOOL_DIRS.iter().any(|dir| guest.is_executable(&format!("{dir}/{tool}")))
}

/// Runs a guest program, printing its output into the task log; on failure the output is
/// returned for the error message.
fn run_logged(guest: &GuestRoot, argv: &[&str]) -> Result<Result<(), String>, String> {
    let (status, text) = GuestCommand::new(guest, argv).combined_output()?;
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
