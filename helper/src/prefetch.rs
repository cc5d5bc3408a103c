//! Warms the page cache with the guest's shell, its dynamic loader and its libraries as soon as
//! the root filesystem is mounted, when the run will start guest programs. Under TCG the first
//! chrooted command otherwise waits about 75 ms for these reads alone; asked for ahead, on a
//! thread of their own (`posix_fadvise(WILLNEED)` starts the reads and returns), they proceed
//! while the other filesystems are mounted and the file operations run.

use crate::guest::GuestRoot;
use imgforge_protocol::bytes::{le16, le32, le64};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// The warming thread, while it runs: it holds files of the guest open.
static RUNNING: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);

/// Starts warming the guest mounted at `root` on a thread; [`wait`] for it before unmounting.
pub fn start(root: PathBuf) {
    let thread = std::thread::spawn(move || {
        if let Ok(guest) = GuestRoot::open(&root) {
            guest_shell(&guest);
        }
    });
    if let Ok(mut running) = RUNNING.lock() {
        *running = Some(thread);
    }
}

/// Waits for the warming thread, if one was started: then no file of the guest is open.
pub fn wait() {
    let thread = RUNNING.lock().ok().and_then(|mut r| r.take());
    if let Some(thread) = thread {
        let _ = thread.join();
    }
}

/// Largest shell binary read to find its dependencies (dash is 125 KiB, bash 1.3 MiB).
const MAX_SHELL_BYTES: u64 = 4 << 20;
/// Where the guest's libraries are looked up, after the dynamic loader's own directory.
const LIBRARY_DIRS: [&str; 6] =
    ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

/// What a dynamically linked program needs to start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Its ELF interpreter (`/lib64/ld-linux-x86-64.so.2`).
    pub interpreter: Option<String>,
    /// Its `DT_NEEDED` libraries (`libc.so.6`).
    pub libraries: Vec<String>,
}

/// Reads the interpreter and needed libraries of a 64-bit little-endian ELF program (pure;
/// anything malformed yields what could be read).
pub fn needs(elf: &[u8]) -> Needs {
    let mut out = Needs::default();
    let u16_at = |o: usize| le16(elf, o).map(usize::from);
    let (u32_at, u64_at) = (|o| le32(elf, o), |o| le64(elf, o));
    let c_str = |o: usize| {
        let rest = elf.get(o..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
    };
    if !elf.starts_with(b"\x7fELF") || elf.get(4..6) != Some(&[2, 1]) {
        return out;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return out;
    };
    // (type, offset, vaddr, filesz) of each program header.
    let headers: Vec<(u32, u64, u64, u64)> = (0..phnum)
        .filter_map(|i| {
            let h = usize::try_from(phoff).ok()?.checked_add(i.checked_mul(phentsize)?)?;
            let at = |delta: usize| h.checked_add(delta);
            Some((u32_at(h)?, u64_at(at(8)?)?, u64_at(at(16)?)?, u64_at(at(32)?)?))
        })
        .collect();
    let file_offset = |vaddr: u64| {
        headers
            .iter()
            .find(|(t, _, va, sz)| *t == PT_LOAD && *va <= vaddr && vaddr < va.saturating_add(*sz))
            .and_then(|(_, off, va, _)| usize::try_from((vaddr - va).checked_add(*off)?).ok())
    };
    for &(kind, offset, _, _) in &headers {
        let Ok(offset) = usize::try_from(offset) else { continue };
        match kind {
            PT_INTERP => out.interpreter = c_str(offset),
            PT_DYNAMIC => {
                let entries: Vec<(u64, u64)> = (0..)
                    .map_while(|i: usize| {
                        let at = offset.checked_add(i.checked_mul(16)?)?;
                        Some((u64_at(at)?, u64_at(at.checked_add(8)?)?))
                    })
                    .take_while(|(tag, _)| *tag != DT_NULL)
                    .collect();
                let Some(strtab) = entries.iter().find(|(t, _)| *t == DT_STRTAB).and_then(|(_, v)| file_offset(*v))
                else {
                    continue;
                };
                out.libraries = entries
                    .iter()
                    .filter(|(t, _)| *t == DT_NEEDED)
                    .filter_map(|(_, v)| c_str(strtab.checked_add(usize::try_from(*v).ok()?)?))
                    .collect();
            }
            _ => {}
        }
    }
    out
}

/// Starts reading the guest's `/bin/sh`, its interpreter and libraries into the page cache;
/// returns how many files it asked for. Failures only cost the time they would have saved.
pub fn guest_shell(guest: &GuestRoot) -> usize {
    let Ok(mut shell) = guest.open_read("/bin/sh") else { return 0 };
    let mut elf = Vec::new();
    if (&mut shell).take(MAX_SHELL_BYTES).read_to_end(&mut elf).is_err() {
        return 0;
    }
    let needs = needs(&elf);
    let mut dirs: Vec<String> = Vec::new();
    let mut asked = 1;
    if let Some(interp) = &needs.interpreter {
        if let Ok(file) = guest.open_read(interp) {
            will_need(&file);
            asked += 1;
        }
        if let Ok(real) = guest.resolve(interp) {
            // The loader's directory inside the guest (merged /usr or not): its siblings first.
            let real = real.strip_prefix(guest.path()).map(|p| format!("/{}", p.display())).unwrap_or_default();
            dirs.extend(real.rsplit_once('/').map(|(dir, _)| dir.to_owned()).filter(|d| !d.is_empty()));
        }
    }
    dirs.extend(LIBRARY_DIRS.iter().map(|d| (*d).to_owned()));
    for library in needs.libraries.iter().filter(|l| !l.contains('/')) {
        if let Some(file) = dirs.iter().find_map(|d| guest.open_read(&format!("{d}/{library}")).ok()) {
            will_need(&file);
            asked += 1;
        }
    }
    asked
}

fn will_need(file: &std::fs::File) {
    // SAFETY: a valid descriptor; offset 0 and length 0 mean the whole file.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_shell_needs() {
        // The host's own /bin/sh is a real dynamically linked program (dash on Debian).
        let elf = std::fs::read("/bin/sh").unwrap();
        let got = needs(&elf);
        assert_eq!(got.interpreter.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(got.libraries.iter().any(|l| l == "libc.so.6"), "{got:?}");
    }

    #[test]
    fn malformed_input_yields_what_it_can() {
        assert_eq!(needs(b""), Needs::default());
        assert_eq!(needs(b"#!/bin/sh\necho"), Needs::default());
        let elf = std::fs::read("/bin/sh").unwrap();
        for cut in [16, 64, 0x40 + 56 * 3, elf.len() / 2] {
            let _ = needs(&elf[..cut.min(elf.len())]);
        }
        let mut scrambled = elf.clone();
        for b in scrambled.iter_mut().skip(0x20).step_by(7) {
            *b = b.wrapping_mul(31);
        }
        let _ = needs(&scrambled);
    }
}
