//! What the guest's own programs can reach in the helper VM, and how they are started.
//!
//! Every program of the guest (its shell for `--run`, its rpm and dnf, their scriptlets) is the
//! attacker's and runs as root. A chroot alone does not hold root: it could open the report
//! port (`/dev/ttyS1`) and write `SUCCESS` before the real work failed, make the node again with
//! `mknod`, reach it through `/proc/1/root`, or leave the chroot. So the guest gets:
//! - a `/dev` of its own (a tmpfs with null, zero, full, random, urandom, tty, a private devpts
//!   and `fd` links: what rpm, dnf and apt need), without the serial ports, the floppy (the
//!   rules) or the disks; the guest's filesystems are mounted `nodev`, so a device node the
//!   image carries opens nothing;
//! - `/sys` and `/proc/sys` read-only (a writable `kernel.core_pattern` or `uevent_helper` has the
//!   kernel start a program of the attacker's with every privilege);
//! - no capability to undo that: [`DROPPED_CAPABILITIES`] leave the bounding set before the
//!   guest program starts (mknod, mount, chroot, ptrace of PID 1, raw port I/O, modules), and
//!   user namespaces (which would hand them back) are disabled for the whole VM.
//!
//! This keeps the report channel as simple as it is (no secret to hide from root in the same
//! VM, which a per-run key on the floppy would need) and closes the other ways out of the chroot
//! too.

use crate::guest::GuestRoot;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

/// The command search path of guest programs.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Capabilities a guest program never gets (numbers from linux/capability.h): with any of them,
/// root in the chroot reaches the helper (see the module documentation). CAP_SYS_TIME too: with
/// the clock set back, a program could give a file it changed the very change time the base's
/// file had, and a tree manifest takes a file of unchanged path, inode, size and times for the
/// base's (`snapshot::digest_cache`).
const DROPPED_CAPABILITIES: [(libc::c_ulong, &str); 11] = [
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (18, "CAP_SYS_CHROOT"),
    (19, "CAP_SYS_PTRACE"),
    (21, "CAP_SYS_ADMIN"),
    (22, "CAP_SYS_BOOT"),
    (25, "CAP_SYS_TIME"),
    (26, "CAP_SYS_TTY_CONFIG"),
    (27, "CAP_MKNOD"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

/// The character devices of the guest's `/dev`: name, major, minor, mode.
const GUEST_DEVICES: [(&str, u32, u32, u32); 6] = [
    ("null", 1, 3, 0o666),
    ("zero", 1, 5, 0o666),
    ("full", 1, 7, 0o666),
    ("random", 1, 8, 0o666),
    ("urandom", 1, 9, 0o666),
    ("tty", 5, 0, 0o666),
];

/// The links of the guest's `/dev`.
const GUEST_DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Where user namespaces are limited; 0 disables them.
const MAX_USER_NAMESPACES: &str = "/proc/sys/user/max_user_namespaces";

/// Disables user namespaces in the helper VM before any guest program runs: in a namespace of
/// its own, a guest program would have every capability again.
pub fn disable_user_namespaces() -> Result<(), String> {
    match std::fs::write(MAX_USER_NAMESPACES, "0") {
        Ok(()) => Ok(()),
        // A kernel without user namespaces has nothing to disable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot disable user namespaces ({MAX_USER_NAMESPACES}): {e}")),
    }
}

/// A pseudo filesystem mounted for chrooted commands, for the unmount task to undo.
pub type Recorded<'a> = &'a mut dyn FnMut(&Path) -> Result<(), String>;

/// Mounts what chrooted commands expect, `/dev`, `/proc` and `/sys`, confined as the module
/// documentation says; never on a symlink (resolved inside the guest), each mount recorded.
pub fn mount_chroot_filesystems(guest: &GuestRoot, record: Recorded<'_>) -> Result<(), String> {
    let dir = |path: &str| guest.resolve(path).ok().filter(|p| p.is_dir());
    if let Some(dev) = dir("/dev") {
        mount_guest_dev(&dev, record)?;
    }
    if let Some(proc) = dir("/proc") {
        mount_flags("proc", &proc, "proc", NO_DEV_SUID_EXEC, None)
            .map_err(|e| format!("cannot mount proc on {}: {e}", proc.display()))?;
        record(&proc)?;
        // A fresh procfs: nothing of the guest's lies on this path.
        let sys = proc.join("sys");
        mount_flags(&sys, &sys, "", libc::MS_BIND, None)
            .and_then(|()| mount_flags("", &sys, "", libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY, None))
            .map_err(|e| format!("cannot make {} read-only: {e}", sys.display()))?;
        record(&sys)?;
    }
    if let Some(sys) = dir("/sys") {
        mount_flags("sysfs", &sys, "sysfs", NO_DEV_SUID_EXEC | libc::MS_RDONLY, None)
            .map_err(|e| format!("cannot mount sysfs on {}: {e}", sys.display()))?;
        record(&sys)?;
    }
    Ok(())
}

const NO_DEV_SUID_EXEC: libc::c_ulong = libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC;

/// The guest's own `/dev` on `dev` (a helper path): a tmpfs with [`GUEST_DEVICES`] and
/// [`GUEST_DEV_LINKS`], a private devpts and `/dev/shm`.
fn mount_guest_dev(dev: &Path, record: Recorded<'_>) -> Result<(), String> {
    let fail = |what: &str, e: std::io::Error| format!("cannot prepare the guest's /dev ({what}): {e}");
    mount_flags(
        crate::pseudo_filesystems::GUEST_DEV_SOURCE,
        dev,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(|e| fail("tmpfs", e))?;
    record(dev)?;
    // A fresh tmpfs: the paths below are ours alone until a guest program runs.
    for (name, major, minor, mode) in GUEST_DEVICES {
        let path = path_cstring(&dev.join(name));
        // SAFETY: a NUL-terminated path; makedev is a pure computation.
        let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, libc::makedev(major, minor)) };
        if rc != 0 {
            return Err(fail(name, std::io::Error::last_os_error()));
        }
        // mknod obeys the umask; the modes must be exact.
        std::os::unix::fs::chown(dev.join(name), Some(0), Some(0)).map_err(|e| fail(name, e))?;
        std::fs::set_permissions(dev.join(name), std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| fail(name, e))?;
    }
    for (name, target) in GUEST_DEV_LINKS {
        std::os::unix::fs::symlink(target, dev.join(name)).map_err(|e| fail(name, e))?;
    }
    let shm = dev.join("shm");
    std::fs::create_dir(&shm)
        .and_then(|()| std::fs::set_permissions(&shm, std::os::unix::fs::PermissionsExt::from_mode(0o1777)))
        .map_err(|e| fail("shm", e))?;
    let pts = dev.join("pts");
    std::fs::create_dir(&pts).map_err(|e| fail("pts", e))?;
    mount_flags(
        "devpts",
        &pts,
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| fail("devpts", e))?;
    record(&pts)
}

/// A guest program to run chrooted into the guest and confined; its output goes where this
/// process's goes unless [`GuestCommand::output`] collects it.
pub struct GuestCommand {
    command: Command,
    program: String,
}

impl GuestCommand {
    /// `argv[0]` with the rest as its arguments, each one argument (no shell between), with a
    /// clean environment.
    pub fn new(guest: &GuestRoot, argv: &[&str]) -> Self {
        let program = argv.first().copied().unwrap_or_default().to_owned();
        let mut command = Command::new(&program);
        command
            .args(argv.iter().skip(1))
            .env_clear()
            .env("PATH", GUEST_PATH)
            .env("HOME", "/root")
            .env("LANG", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        let root = guest.path().to_owned();
        // SAFETY: chroot, chdir and prctl are async-signal-safe; nothing else runs between fork
        // and exec.
        unsafe {
            command.pre_exec(move || {
                std::os::unix::fs::chroot(&root)?;
                std::env::set_current_dir("/")?;
                drop_capabilities()
            });
        }
        Self { command, program }
    }

    /// Adds one variable to the program's (otherwise clean) environment.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.command.env(name, value);
        self
    }

    /// Waits for the program; an error unless it exited 0.
    pub fn status(&mut self) -> Result<(), String> {
        let status = self.command.status().map_err(|e| format!("cannot start {} in the guest: {e}", self.program));
        end_leftovers()?;
        let status = status?;
        match status.code() {
            Some(0) => Ok(()),
            Some(code) => Err(format!("command exited with status {code}")),
            None => Err(format!("command was killed ({status})")),
        }
    }

    /// Waits for the program: its exit status (an error when it could not start or was killed).
    pub fn code(&mut self) -> Result<i32, String> {
        let status = self.command.status().map_err(|e| format!("cannot start {} in the guest: {e}", self.program));
        end_leftovers()?;
        let status = status?;
        status.code().ok_or_else(|| format!("command was killed ({status})"))
    }

    /// Runs the program and collects its standard output and error apart (for output that is
    /// parsed: a program's stdio buffering interleaves the two mid-line), each at most
    /// [`OUTPUT_CAP`] bytes: a program that writes more is killed and this fails, for a hostile
    /// guest's program could otherwise fill the helper VM's memory.
    pub fn output(mut self) -> Result<std::process::Output, String> {
        let program = std::mem::take(&mut self.program);
        let fail = |e: std::io::Error| format!("cannot start {program} in the guest: {e}");
        self.command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.command.spawn().map_err(fail)?;
        drop(self.command);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (stdout, stderr) = std::thread::scope(|scope| {
            let errors = scope.spawn(|| stderr.map(|r| read_capped(r, OUTPUT_CAP)).unwrap_or(Ok(Vec::new())));
            let out = stdout.map(|r| read_capped(r, OUTPUT_CAP)).unwrap_or(Ok(Vec::new()));
            if out.is_err() {
                // Its other stream would never end while it runs.
                let _ = child.kill();
            }
            let errors = errors.join().unwrap_or_else(|_| Ok(Vec::new()));
            if errors.is_err() {
                let _ = child.kill();
            }
            (out, errors)
        });
        let status = child.wait().map_err(|e| format!("cannot wait for {program} in the guest: {e}"));
        end_leftovers()?;
        let overflow = |stream: &str, e: Overflow| format!("{program} in the guest wrote {e} on its {stream}: stopped");
        let stdout = stdout.map_err(|e| overflow("standard output", e))?;
        let stderr = stderr.map_err(|e| overflow("standard error", e))?;
        Ok(std::process::Output { status: status?, stdout, stderr })
    }

    /// Runs the program and collects its standard output and error as one text, interleaved
    /// as it wrote them (the last lines of a failure are its message).
    pub fn combined_output(mut self) -> Result<(ExitStatus, String), String> {
        let program = std::mem::take(&mut self.program);
        let fail = |e: std::io::Error| format!("cannot start {program} in the guest: {e}");
        let (mut reader, writer) = std::io::pipe().map_err(fail)?;
        self.command.stdout(writer.try_clone().map_err(fail)?).stderr(writer);
        let mut child = self.command.spawn().map_err(fail)?;
        // The Command holds the pipe's write ends; drop it so that EOF can arrive.
        drop(self.command);
        let (bytes, cut) = read_tail(&mut reader, TAIL_KEPT);
        let status = child.wait().map_err(|e| format!("cannot wait for {program} in the guest: {e}"));
        end_leftovers()?;
        let mut text = String::new();
        if cut {
            text.push_str(&format!("[{program}: only the last {TAIL_KEPT} bytes of its output are kept]\n"));
        }
        text.push_str(&String::from_utf8_lossy(&bytes));
        Ok((status?, text))
    }
}

/// The most of each output stream [`GuestCommand::output`] collects (setfiles `-v` lists one
/// line per path relabelled: a large guest's whole tree stays well under it).
pub const OUTPUT_CAP: u64 = 64 << 20;

/// A stream that went past its cap, or could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Overflow {
    /// More than this many bytes.
    Over(u64),
    /// The read failed.
    Read(String),
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overflow::Over(cap) => write!(f, "more than {cap} bytes (all the helper collects)"),
            Overflow::Read(e) => write!(f, "what could not be read ({e})"),
        }
    }
}

/// All of `reader` if it ends within `cap` bytes; reads one byte past `cap` at most.
pub fn read_capped(reader: impl Read, cap: u64) -> Result<Vec<u8>, Overflow> {
    let mut bytes = Vec::new();
    reader.take(cap + 1).read_to_end(&mut bytes).map_err(|e| Overflow::Read(e.to_string()))?;
    if bytes.len() as u64 > cap {
        return Err(Overflow::Over(cap));
    }
    Ok(bytes)
}

/// The most of a program's output [`GuestCommand::combined_output`] keeps: its end, where a
/// failure's message is (the host shows at most 8 MiB of a run's console anyway).
pub const TAIL_KEPT: usize = 8 << 20;

/// The last `keep` bytes of `reader` (read to its end or its first error), and whether
/// anything before them was dropped: a hostile guest's program that writes without end costs
/// the helper at most twice `keep` of memory, never its whole output.
pub fn read_tail(mut reader: impl Read, keep: usize) -> (Vec<u8>, bool) {
    let mut bytes = Vec::new();
    let mut cut = false;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if bytes.len() > keep.saturating_mul(2) {
            bytes.drain(..bytes.len() - keep);
            cut = true;
        }
    }
    if bytes.len() > keep {
        bytes.drain(..bytes.len() - keep);
        cut = true;
    }
    (bytes, cut)
}

/// How long [`end_leftovers`] keeps killing before it gives up.
const LEFTOVER_ROUNDS: usize = 500;

/// Ends every process a guest program left running (a daemon it started, a child it did not
/// wait for): without this, one runs beside the helper's later tasks, which take the guest's
/// tree as still while they work on it by path (the relabel's `lsetxattr`), keeps the guest's
/// filesystems busy so that they cannot be unmounted, and writes to the guest after it was
/// checked. Guest processes are the ones whose root is not the helper's `/`: they run chrooted
/// and cannot chroot again (no CAP_SYS_CHROOT, no CAP_SYS_ADMIN for `pivot_root`). Killed again
/// until a look at `/proc` finds none alive, so a child forked meanwhile is found too; a killed
/// process becomes a zombie, whose root the kernel no longer gives.
pub fn end_leftovers() -> Result<(), String> {
    let mut ended = std::collections::BTreeSet::new();
    for _ in 0..LEFTOVER_ROUNDS {
        let alive = guest_processes(proc_roots());
        if alive.is_empty() {
            if !ended.is_empty() {
                println!("ended {} processes a guest program left running", ended.len());
            }
            return Ok(());
        }
        for pid in alive {
            // SAFETY: kill with a plain pid and signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            ended.insert(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(format!("processes a guest program left running could not be ended ({} killed)", ended.len()))
}

/// Every process of `/proc` but this one, with where its root is (`None` when the kernel does
/// not say: a zombie, a process gone meanwhile).
fn proc_roots() -> Vec<(i32, Option<std::path::PathBuf>)> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| *pid != me && *pid > 1)
        .map(|pid| (pid, std::fs::read_link(format!("/proc/{pid}/root")).ok()))
        .collect()
}

/// The processes of `roots` whose root is not `/`: the guest's (pure).
fn guest_processes(roots: Vec<(i32, Option<std::path::PathBuf>)>) -> Vec<i32> {
    roots.into_iter().filter(|(_, root)| root.as_deref().is_some_and(|r| r != Path::new("/"))).map(|(p, _)| p).collect()
}

/// Takes [`DROPPED_CAPABILITIES`] out of the bounding set: root's capabilities after exec.
fn drop_capabilities() -> std::io::Result<()> {
    for (cap, _) in DROPPED_CAPABILITIES {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let err = std::io::Error::last_os_error();
            // A capability newer than the kernel does not exist there: nothing to drop.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// `imgforge-helper in-guest PROGRAM ARGS...`: runs a guest program confined (for task
/// scripts), its exit status passed on.
pub fn in_guest_main(argv: &[String]) -> std::process::ExitCode {
    let env = crate::task_env::TaskEnv::from_process();
    let guest = match env
        .require("IMGFORGE_TARGET")
        .and_then(|t| GuestRoot::open(Path::new(t)).map_err(|e| format!("cannot open the guest root {t}: {e}")))
    {
        Ok(g) => g,
        Err(e) => {
            eprintln!("imgforge-helper in-guest: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let status = GuestCommand::new(&guest, &argv).command.status();
    if let Err(e) = end_leftovers() {
        eprintln!("imgforge-helper in-guest: {e}");
        return std::process::ExitCode::from(2);
    }
    match status {
        Ok(s) => std::process::ExitCode::from(s.code().map_or(128, |c| c.clamp(0, 255) as u8)),
        Err(e) => {
            eprintln!("imgforge-helper in-guest: cannot start {}: {e}", argv[0]);
            std::process::ExitCode::from(127)
        }
    }
}

/// A path as a C string (an interior NUL, impossible in a path the kernel gave, makes it empty).
pub fn path_cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

/// mount(2), with a data string when given.
pub fn mount_flags(
    source: impl AsRef<Path>,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let (source, target) = (path_cstring(source.as_ref()), path_cstring(target));
    let fstype = CString::new(fstype).unwrap_or_default();
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let data_ptr = data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: every pointer is NUL-terminated (or null for data) and outlives the call.
    crate::copy::cvt(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data_ptr) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capabilities that would undo the confinement are all dropped.
    #[test]
    fn the_dangerous_capabilities_are_dropped() {
        let names: Vec<&str> = DROPPED_CAPABILITIES.iter().map(|(_, n)| *n).collect();
        for cap in ["CAP_MKNOD", "CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_RAWIO", "CAP_SYS_TIME"] {
            assert!(names.contains(&cap), "{cap}");
        }
        assert!(!GUEST_DEVICES.iter().any(|(n, ..)| n.starts_with("tty") && *n != "tty"), "no serial port");
    }

    /// A stream past the cap is refused after one byte more is read, not collected whole.
    #[test]
    fn output_is_capped() {
        assert_eq!(read_capped(&b"0123456789"[..], 10), Ok(b"0123456789".to_vec()));
        assert_eq!(read_capped(&b""[..], 10), Ok(Vec::new()));
        assert_eq!(read_capped(&b"0123456789!"[..], 10), Err(Overflow::Over(10)));
        // An endless stream (setfiles of a hostile guest) ends at the cap.
        let mut endless = std::io::repeat(b'x');
        assert_eq!(read_capped(&mut endless, 1 << 20), Err(Overflow::Over(1 << 20)));
        assert!(Overflow::Over(OUTPUT_CAP).to_string().contains("more than 67108864 bytes"));
    }

    #[test]
    fn combined_output_keeps_the_tail() {
        assert_eq!(read_tail(&b"0123456789"[..], 10), (b"0123456789".to_vec(), false));
        assert_eq!(read_tail(&b"0123456789ab"[..], 10), (b"23456789ab".to_vec(), true));
        // A long stream ends with only its last bytes held, whatever its length.
        let long = std::io::repeat(b'x').take(10 << 20).chain(&b"the message"[..]);
        let (tail, cut) = read_tail(long, 1 << 20);
        assert!(cut);
        assert_eq!(tail.len(), 1 << 20);
        assert!(tail.ends_with(b"xthe message"));
    }

    #[test]
    fn guest_processes_are_the_chrooted_ones() {
        let roots = vec![
            (5, Some("/".into())),
            (6, Some("/mnt/guest".into())),
            (7, None),
            (8, Some("/mnt/guest (deleted)".into())),
        ];
        assert_eq!(guest_processes(roots), [6, 8]);
    }
}
