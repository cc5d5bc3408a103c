//! Lines the helper writes on its second serial port, and the verdict the host draws from them.
//!
//! One event a line, ASCII keyword first:
//!
//! ```text
//! PHASE rules-read 1840          a boot phase reached, at this guest uptime (ms)
//! TASK-START 10-MountRoot
//! TASK-END 10-MountRoot 412      the task succeeded after this many ms
//! WARNING 50-Customize "text"    message as a JSON string (one line, escaped)
//! ERROR 50-Customize "text"      the task failed; nothing runs after it
//! CHANGE {"change":"added",...}  a dry run added, removed or changed this path (JSON object)
//! CHANGES-OMITTED 120            and this many more, past the cap on listed changes
//! VARIANT-START ath-web          a multi-variant run starts on this variant's disk
//! MANIFEST ath-web 3f9a…         its tree manifest's SHA-256 (crate::manifest), after its operations
//! VARIANT-DONE ath-web           its tasks all succeeded: the host may write its output
//! VARIANT-FAILED ath-web 50-Customize "text"  its task failed; its overlay is dropped
//! DIGESTS-SHARED 2626 9b1c…      the helper wrote the digests of its share of the base's files
//!                                to its export disk (crate::digest_cache), for the other boots:
//!                                that many files, the SHA-256 of the bytes it wrote
//! DIGESTS-KEPT 31022 5e0a…       the helper writes the digests of all the base's files to its
//!                                export disk, for the next builds: that many, their SHA-256
//! SUCCESS                        every task succeeded (in a multi-variant run: the helper
//!                                went through every variant, whether each succeeded or not)
//! ```
//!
//! In a multi-variant run the `TASK-*`, `WARNING` and `CHANGE` lines between a `VARIANT-START`
//! and its `VARIANT-DONE` or `VARIANT-FAILED` are that variant's; `CHANGE` lines then list
//! what its operations added, changed and removed.
//!
//! The serial line may add `\r`, lose the end of the stream, or carry noise; anything but a
//! well-formed `SUCCESS` after no `ERROR` is a failure.

use crate::change::FileChange;
use thiserror::Error;

/// Longest report line accepted; longer ones are noise (a message is capped well below).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Why a line is not a report line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportLineError {
    /// Blank line.
    #[error("empty report line")]
    Empty,
    /// Unknown first word.
    #[error("unknown report keyword in {0:?}")]
    UnknownKeyword(String),
    /// Known keyword, wrong fields.
    #[error("malformed {keyword} report line: {line:?}")]
    Malformed {
        /// The keyword.
        keyword: &'static str,
        /// The offending line (truncated).
        line: String,
    },
}

/// One event on the report port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportLine {
    /// A helper boot phase reached at `uptime_ms` of guest uptime.
    Phase {
        /// Phase name (no spaces).
        name: String,
        /// Guest uptime in milliseconds.
        uptime_ms: u64,
    },
    /// A task started.
    TaskStart {
        /// Task name, `NN-Name`.
        task: String,
    },
    /// A task ended successfully.
    TaskEnd {
        /// Task name.
        task: String,
        /// How long it ran.
        millis: u64,
    },
    /// A task warns about something that did not stop it.
    Warning {
        /// Task name (or `helper`).
        task: String,
        /// The warning.
        message: String,
    },
    /// A task failed (or the helper itself, as task `helper`).
    Error {
        /// Task name.
        task: String,
        /// What went wrong.
        message: String,
    },
    /// The result of one `verify` check.
    Check {
        /// Whether it passed.
        ok: bool,
        /// What was checked (`filesystem-vda1`, `package-demo`).
        name: String,
        /// What was found.
        detail: String,
    },
    /// A dry run added, removed or changed a path (its path escaped by the helper).
    Change(FileChange),
    /// A dry run changed this many paths more than it listed.
    ChangesOmitted {
        /// How many.
        count: u64,
    },
    /// A multi-variant run starts on a variant.
    VariantStart {
        /// The variant's name.
        name: String,
    },
    /// A variant's tree manifest digest.
    Manifest {
        /// The variant's name.
        name: String,
        /// SHA-256 of its manifest, lowercase hex.
        sha256: String,
    },
    /// The helper wrote the digests of its share of the base's files to its export disk (a
    /// cold multi-variant build: boots side by side each read a share, then take the others').
    DigestsShared {
        /// How many files' digests it wrote.
        files: u64,
        /// SHA-256 of the digest cache it wrote, lowercase hex: the host takes those bytes only
        /// (the export disk is the guest's too once its programs run, and the host may read it
        /// late).
        sha256: String,
    },
    /// The helper writes the digests of the base's files to the first region of its export disk,
    /// for the next builds of the base; sent before any guest program runs.
    DigestsKept {
        /// How many files' digests it writes.
        files: u64,
        /// SHA-256 of the digest cache it writes, lowercase hex: the host keeps those bytes only.
        sha256: String,
    },
    /// Every task of a variant succeeded.
    VariantDone {
        /// The variant's name.
        name: String,
    },
    /// A task of a variant failed: that variant alone failed.
    VariantFailed {
        /// The variant's name.
        name: String,
        /// The task that failed.
        task: String,
        /// What went wrong.
        message: String,
    },
    /// Every task succeeded.
    Success,
}

fn is_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl ReportLine {
    /// This line with every string made safe to print ([`crate::printable::printable`]): the
    /// messages carry output of programs in the guest.
    pub fn printable(self) -> Self {
        let p = |s: String| crate::printable::printable(&s).into_owned();
        match self {
            ReportLine::Phase { name, uptime_ms } => ReportLine::Phase { name: p(name), uptime_ms },
            ReportLine::TaskStart { task } => ReportLine::TaskStart { task: p(task) },
            ReportLine::TaskEnd { task, millis } => ReportLine::TaskEnd { task: p(task), millis },
            ReportLine::Warning { task, message } => ReportLine::Warning { task: p(task), message: p(message) },
            ReportLine::Error { task, message } => ReportLine::Error { task: p(task), message: p(message) },
            ReportLine::Check { ok, name, detail } => ReportLine::Check { ok, name: p(name), detail: p(detail) },
            // One change, one line: the helper escaped the newline already, and must have.
            ReportLine::Change(change) => {
                ReportLine::Change(FileChange { path: p(change.path).replace('\n', "\\n"), ..change })
            }
            ReportLine::ChangesOmitted { count } => ReportLine::ChangesOmitted { count },
            ReportLine::DigestsShared { files, sha256 } => ReportLine::DigestsShared { files, sha256: p(sha256) },
            ReportLine::DigestsKept { files, sha256 } => ReportLine::DigestsKept { files, sha256: p(sha256) },
            ReportLine::VariantStart { name } => ReportLine::VariantStart { name: p(name) },
            ReportLine::Manifest { name, sha256 } => ReportLine::Manifest { name: p(name), sha256: p(sha256) },
            ReportLine::VariantDone { name } => ReportLine::VariantDone { name: p(name) },
            ReportLine::VariantFailed { name, task, message } => {
                ReportLine::VariantFailed { name: p(name), task: p(task), message: p(message) }
            }
            ReportLine::Success => ReportLine::Success,
        }
    }

    /// Parses one line (trailing `\r`/`\n` ignored).
    pub fn parse(line: &str) -> Result<Self, ReportLineError> {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return Err(ReportLineError::Empty);
        }
        let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
        let malformed =
            |keyword: &'static str| ReportLineError::Malformed { keyword, line: line.chars().take(200).collect() };
        match keyword {
            "SUCCESS" if line == "SUCCESS" => Ok(ReportLine::Success),
            "SUCCESS" => Err(malformed("SUCCESS")),
            "TASK-START" if is_word(rest) => Ok(ReportLine::TaskStart { task: rest.to_owned() }),
            "TASK-START" => Err(malformed("TASK-START")),
            "TASK-END" | "PHASE" => {
                let kw = if keyword == "PHASE" { "PHASE" } else { "TASK-END" };
                let (name, num) = rest.split_once(' ').ok_or_else(|| malformed(kw))?;
                let n: u64 = num.parse().map_err(|_| malformed(kw))?;
                if !is_word(name) {
                    return Err(malformed(kw));
                }
                Ok(if kw == "PHASE" {
                    ReportLine::Phase { name: name.to_owned(), uptime_ms: n }
                } else {
                    ReportLine::TaskEnd { task: name.to_owned(), millis: n }
                })
            }
            "CHECK" => {
                let mut parts = rest.splitn(3, ' ');
                let (Some(status), Some(name), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
                    return Err(malformed("CHECK"));
                };
                let ok = match status {
                    "ok" => true,
                    "fail" => false,
                    _ => return Err(malformed("CHECK")),
                };
                if !is_word(name) {
                    return Err(malformed("CHECK"));
                }
                let detail: String = serde_json::from_str(json).map_err(|_| malformed("CHECK"))?;
                Ok(ReportLine::Check { ok, name: name.to_owned(), detail })
            }
            "VARIANT-START" if is_word(rest) => Ok(ReportLine::VariantStart { name: rest.to_owned() }),
            "VARIANT-START" => Err(malformed("VARIANT-START")),
            "VARIANT-DONE" if is_word(rest) => Ok(ReportLine::VariantDone { name: rest.to_owned() }),
            "VARIANT-DONE" => Err(malformed("VARIANT-DONE")),
            "MANIFEST" => match rest.split_once(' ') {
                Some((name, sha)) if is_word(name) && crate::manifest::is_sha256_hex(sha) => {
                    Ok(ReportLine::Manifest { name: name.to_owned(), sha256: sha.to_owned() })
                }
                _ => Err(malformed("MANIFEST")),
            },
            "VARIANT-FAILED" => {
                let mut parts = rest.splitn(3, ' ');
                let (Some(name), Some(task), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
                    return Err(malformed("VARIANT-FAILED"));
                };
                if !is_word(name) || !is_word(task) {
                    return Err(malformed("VARIANT-FAILED"));
                }
                let message: String = serde_json::from_str(json).map_err(|_| malformed("VARIANT-FAILED"))?;
                Ok(ReportLine::VariantFailed { name: name.to_owned(), task: task.to_owned(), message })
            }
            "CHANGE" => serde_json::from_str(rest).map(ReportLine::Change).map_err(|_| malformed("CHANGE")),
            "DIGESTS-SHARED" | "DIGESTS-KEPT" => {
                let kw = if keyword == "DIGESTS-KEPT" { "DIGESTS-KEPT" } else { "DIGESTS-SHARED" };
                match rest.split_once(' ') {
                    Some((files, sha)) if crate::manifest::is_sha256_hex(sha) => {
                        let files = files.parse().map_err(|_| malformed(kw))?;
                        let sha256 = sha.to_owned();
                        Ok(if kw == "DIGESTS-KEPT" {
                            ReportLine::DigestsKept { files, sha256 }
                        } else {
                            ReportLine::DigestsShared { files, sha256 }
                        })
                    }
                    _ => Err(malformed(kw)),
                }
            }
            "CHANGES-OMITTED" => {
                rest.parse().map(|count| ReportLine::ChangesOmitted { count }).map_err(|_| malformed("CHANGES-OMITTED"))
            }
            "WARNING" | "ERROR" => {
                let kw = if keyword == "ERROR" { "ERROR" } else { "WARNING" };
                let (task, json) = rest.split_once(' ').ok_or_else(|| malformed(kw))?;
                if !is_word(task) {
                    return Err(malformed(kw));
                }
                let message: String = serde_json::from_str(json).map_err(|_| malformed(kw))?;
                let task = task.to_owned();
                Ok(if kw == "ERROR" {
                    ReportLine::Error { task, message }
                } else {
                    ReportLine::Warning { task, message }
                })
            }
            other => Err(ReportLineError::UnknownKeyword(other.chars().take(40).collect())),
        }
    }
}

impl std::fmt::Display for ReportLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = |s: &str| serde_json::to_string(s).expect("strings always serialize");
        match self {
            ReportLine::Phase { name, uptime_ms } => write!(f, "PHASE {name} {uptime_ms}"),
            ReportLine::TaskStart { task } => write!(f, "TASK-START {task}"),
            ReportLine::TaskEnd { task, millis } => write!(f, "TASK-END {task} {millis}"),
            ReportLine::Warning { task, message } => write!(f, "WARNING {task} {}", json(message)),
            ReportLine::Error { task, message } => write!(f, "ERROR {task} {}", json(message)),
            ReportLine::Check { ok, name, detail } => {
                write!(f, "CHECK {} {name} {}", if *ok { "ok" } else { "fail" }, json(detail))
            }
            ReportLine::Change(change) => {
                write!(f, "CHANGE {}", serde_json::to_string(change).expect("changes always serialize"))
            }
            ReportLine::ChangesOmitted { count } => write!(f, "CHANGES-OMITTED {count}"),
            ReportLine::DigestsShared { files, sha256 } => write!(f, "DIGESTS-SHARED {files} {sha256}"),
            ReportLine::DigestsKept { files, sha256 } => write!(f, "DIGESTS-KEPT {files} {sha256}"),
            ReportLine::VariantStart { name } => write!(f, "VARIANT-START {name}"),
            ReportLine::Manifest { name, sha256 } => write!(f, "MANIFEST {name} {sha256}"),
            ReportLine::VariantDone { name } => write!(f, "VARIANT-DONE {name}"),
            ReportLine::VariantFailed { name, task, message } => {
                write!(f, "VARIANT-FAILED {name} {task} {}", json(message))
            }
            ReportLine::Success => f.write_str("SUCCESS"),
        }
    }
}

/// Splits a byte stream into complete lines; an unterminated tail is never returned as a line.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
    overlong: bool,
}

impl LineSplitter {
    /// Feeds bytes, returning every line they complete (lossy UTF-8, overlong lines dropped).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            let complete = chunk.last() == Some(&b'\n');
            let body = if complete { &chunk[..chunk.len() - 1] } else { chunk };
            if !self.overlong {
                self.pending.extend_from_slice(body);
                if self.pending.len() > MAX_LINE_BYTES {
                    self.overlong = true;
                    self.pending.clear();
                }
            }
            if complete {
                if !self.overlong {
                    lines.push(String::from_utf8_lossy(&self.pending).into_owned());
                }
                self.pending.clear();
                self.overlong = false;
            }
        }
        lines
    }

    /// True when bytes are waiting for their newline (a truncated last line).
    pub fn has_partial_line(&self) -> bool {
        !self.pending.is_empty() || self.overlong
    }
}

/// What the report says about the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `SUCCESS` was reported and no task failed.
    Success,
    /// A task reported an error.
    Failed {
        /// The failing task.
        task: String,
        /// Its message.
        message: String,
    },
    /// The report ended without a verdict.
    Incomplete {
        /// The task that had started and not ended, if any.
        running: Option<String>,
    },
}

/// Accumulates report lines into a [`Verdict`].
#[derive(Debug, Default)]
pub struct VerdictBuilder {
    running: Option<String>,
    error: Option<(String, String)>,
    success: bool,
}

impl VerdictBuilder {
    /// Takes one parsed line into account.
    pub fn observe(&mut self, line: &ReportLine) {
        match line {
            ReportLine::TaskStart { task } => self.running = Some(task.clone()),
            ReportLine::TaskEnd { task, .. } if self.running.as_ref() == Some(task) => self.running = None,
            // The first error is the cause; later ones are consequences.
            ReportLine::Error { task, message } if self.error.is_none() => {
                self.error = Some((task.clone(), message.clone()));
            }
            ReportLine::Success => self.success = true,
            _ => {}
        }
    }

    /// Takes a line that did not parse into account: a garbled `ERROR` or `SUCCESS` line fails
    /// the run, so that a mangled report never reads as a success (other lines are ignored).
    pub fn observe_unparsed(&mut self, line: &str, error: &ReportLineError) {
        let garbled = matches!(error, ReportLineError::Malformed { keyword: "ERROR" | "SUCCESS", .. });
        if garbled && self.error.is_none() {
            let shown: String = line.chars().take(200).collect();
            self.error = Some(("helper".to_owned(), format!("unreadable report line {shown:?}")));
        }
    }

    /// The verdict so far.
    pub fn verdict(&self) -> Verdict {
        match (&self.error, self.success) {
            (Some((task, message)), _) => Verdict::Failed { task: task.clone(), message: message.clone() },
            (None, true) => Verdict::Success,
            (None, false) => Verdict::Incomplete { running: self.running.clone() },
        }
    }
}

/// Reads a whole report (for tests and post-mortem use), as the host reads it live.
pub fn verdict_of(bytes: &[u8]) -> Verdict {
    let mut splitter = LineSplitter::default();
    let mut builder = VerdictBuilder::default();
    for line in splitter.push(bytes) {
        match ReportLine::parse(&line) {
            Ok(parsed) => builder.observe(&parsed),
            Err(e) => builder.observe_unparsed(&line, &e),
        }
    }
    builder.verdict()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok: &[(&str, ReportLine)] = &[
            ("SUCCESS", ReportLine::Success),
            ("SUCCESS\r", ReportLine::Success),
            ("TASK-START 10-MountRoot", ReportLine::TaskStart { task: "10-MountRoot".into() }),
            ("TASK-END 10-MountRoot 412", ReportLine::TaskEnd { task: "10-MountRoot".into(), millis: 412 }),
            ("PHASE init 1600", ReportLine::Phase { name: "init".into(), uptime_ms: 1600 }),
            (
                "ERROR 50-Customize \"exit 7\\nline2\"",
                ReportLine::Error { task: "50-Customize".into(), message: "exit 7\nline2".into() },
            ),
            ("WARNING helper \"x\"", ReportLine::Warning { task: "helper".into(), message: "x".into() }),
            (
                "CHECK ok package-demo \"1.0\"",
                ReportLine::Check { ok: true, name: "package-demo".into(), detail: "1.0".into() },
            ),
            (
                "CHECK fail fs-vda1 \"bad\"",
                ReportLine::Check { ok: false, name: "fs-vda1".into(), detail: "bad".into() },
            ),
        ];
        for (text, want) in ok {
            assert_eq!(&ReportLine::parse(text).unwrap(), want, "{text:?}");
        }
        let bad = [
            "",
            "   ",
            "SUCCES",
            "SUCCESS now",
            "SUCCESS ",
            "success",
            "TASK-START",
            "TASK-START two words",
            "TASK-END 10-X",
            "TASK-END 10-X -1",
            "TASK-END 10-X 12x",
            "PHASE  5",
            "ERROR 50-Customize",
            "ERROR 50-Customize unquoted",
            "ERROR 50-Customize \"unterminated",
            "ERROR bad/task \"x\"",
            "CHECK maybe x \"y\"",
            "CHANGE",
            "CHANGE {}",
            "CHANGE {\"change\":\"added\",\"path\":\"/x\"}",
            "CHANGES-OMITTED",
            "CHANGES-OMITTED -1",
            "DIGESTS-SHARED",
            "DIGESTS-SHARED -3",
            "DIGESTS-SHARED 3",
            "DIGESTS-KEPT 3 notadigest",
            "DIGESTS-KEPT",
            "CHANGES-OMITTED many",
            "CHECK ok x",
            "CHECK ok a/b \"y\"",
            "\u{0}\u{1}garbage",
            "VARIANT-START",
            "VARIANT-START a/b",
            "VARIANT-DONE two words",
            "MANIFEST ath",
            "MANIFEST ath ABCDEF",
            "VARIANT-FAILED ath 50-Customize",
            "VARIANT-FAILED ath 50-Customize unquoted",
        ];
        for text in bad {
            assert!(ReportLine::parse(text).is_err(), "{text:?} should not parse");
        }
        // A variant's failure is its own: the run still succeeds.
        let one_failed =
            b"VARIANT-START a\nVARIANT-FAILED a 50-Customize \"x\"\nVARIANT-START b\nVARIANT-DONE b\nSUCCESS\n";
        assert_eq!(verdict_of(one_failed), Verdict::Success);
        // A garbled ERROR (its closing quote lost) before SUCCESS is a failure, not a success.
        let garbled = b"TASK-START 50-Customize\nERROR 50-Customize \"it failed\nSUCCESS\n";
        assert!(matches!(verdict_of(garbled), Verdict::Failed { .. }), "{:?}", verdict_of(garbled));
        assert!(matches!(verdict_of(b"SUCCESS now\nSUCCESS\n"), Verdict::Failed { .. }));
    }

    #[test]
    fn display_round_trips() {
        let lines = [
            ReportLine::Success,
            ReportLine::TaskStart { task: "10-A".into() },
            ReportLine::TaskEnd { task: "10-A".into(), millis: 3 },
            ReportLine::Phase { name: "modules".into(), uptime_ms: 99 },
            ReportLine::Error { task: "10-A".into(), message: "multi\nline \"quoted\" \u{7f}".into() },
            ReportLine::Warning { task: "10-A".into(), message: String::new() },
            ReportLine::Check { ok: false, name: "package-x".into(), detail: "not \"installed\"".into() },
            ReportLine::Change(crafted_change()),
            ReportLine::ChangesOmitted { count: 12 },
            ReportLine::DigestsShared { files: 2626, sha256: "9b".repeat(32) },
            ReportLine::DigestsKept { files: 31022, sha256: "5e".repeat(32) },
            ReportLine::VariantStart { name: "ath-web.1".into() },
            ReportLine::Manifest { name: "ath-web.1".into(), sha256: "0f".repeat(32) },
            ReportLine::VariantDone { name: "ath-web.1".into() },
            ReportLine::VariantFailed { name: "b".into(), task: "50-Customize".into(), message: "no \"x\"\n".into() },
        ];
        for line in lines {
            let text = line.to_string();
            assert!(!text.contains('\n'));
            assert_eq!(ReportLine::parse(&text).unwrap(), line);
        }
    }

    /// A change whose guest file is named `x<newline>SUCCESS`, escaped as the helper does.
    fn crafted_change() -> FileChange {
        use crate::change::{escape_path, ChangeKind, FileState, FileType};
        FileChange {
            change: ChangeKind::Added,
            path: escape_path(b"/x\nSUCCESS"),
            state: FileState { file_type: FileType::File, mode: 0o644, uid: 0, gid: 0 },
            what: Vec::new(),
            was: None,
        }
    }

    /// A guest file named to look like a verdict stays inside its CHANGE line: the failing run
    /// it was made in stays a failure.
    #[test]
    fn a_crafted_file_name_cannot_forge_a_verdict() {
        let change = ReportLine::Change(crafted_change()).to_string();
        assert!(!change.contains('\n'), "{change:?}");
        let report = format!("TASK-START 50-Customize\n{change}\nERROR 50-Customize \"exit 3\"\n");
        assert!(matches!(verdict_of(report.as_bytes()), Verdict::Failed { .. }), "{report}");
        let ReportLine::Change(parsed) = ReportLine::parse(&change).unwrap().printable() else { panic!("{change}") };
        assert_eq!(parsed.path, "/x\\nSUCCESS");
        // Even a change whose path was not escaped shows on one line.
        let raw = ReportLine::Change(FileChange { path: "/x\nSUCCESS".into(), ..crafted_change() });
        let ReportLine::Change(shown) = ReportLine::parse(&raw.to_string()).unwrap().printable() else { panic!() };
        assert!(!shown.human_line().contains('\n'), "{shown:?}");
    }

    #[test]
    fn splitter_holds_back_partial_lines() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"TASK-START 10-A\r\nSUCC"), vec!["TASK-START 10-A\r".to_string()]);
        assert!(s.has_partial_line());
        assert_eq!(s.push(b"ESS\n"), vec!["SUCCESS".to_string()]);
        assert!(!s.has_partial_line());
    }

    #[test]
    fn splitter_drops_overlong_lines() {
        let mut s = LineSplitter::default();
        let mut long = vec![b'x'; MAX_LINE_BYTES + 10];
        long.push(b'\n');
        assert!(s.push(&long).is_empty());
        assert_eq!(s.push(b"SUCCESS\n"), vec!["SUCCESS".to_string()]);
    }

    #[test]
    fn verdicts() {
        let cases: &[(&[u8], Verdict)] = &[
            (b"TASK-START 10-A\nTASK-END 10-A 5\nSUCCESS\n", Verdict::Success),
            (b"TASK-START 10-A\nTASK-END 10-A 5\nSUCCESS", Verdict::Incomplete { running: None }),
            (b"TASK-START 10-A\n", Verdict::Incomplete { running: Some("10-A".into()) }),
            (b"", Verdict::Incomplete { running: None }),
            (b"\xff\xfe garbage\nSUCCESS\n", Verdict::Success),
            (
                b"TASK-START 10-A\nERROR 10-A \"boom\"\nERROR helper \"later\"\nSUCCESS\n",
                Verdict::Failed { task: "10-A".into(), message: "boom".into() },
            ),
            (
                b"SUCCESS now\n",
                Verdict::Failed { task: "helper".into(), message: "unreadable report line \"SUCCESS now\"".into() },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(&verdict_of(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        /// Whatever parses formats back to one line that parses to the same event.
        fn parsed_lines_round_trip(line in "(SUCCESS|TASK-START|TASK-END|PHASE|WARNING|ERROR|CHECK)( [-a-z0-9_.]{1,8})?( ok| fail)?( [0-9]{1,4}| \"[^\"]{0,20}\")?|.{0,300}") {
            if let Ok(parsed) = ReportLine::parse(&line) {
                let formatted = parsed.to_string();
                prop_assert!(!formatted.contains('\n'));
                prop_assert_eq!(ReportLine::parse(&formatted), Ok(parsed));
            }
        }

        #[test]
        fn arbitrary_bytes_give_a_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = verdict_of(&bytes);
        }

        #[test]
        fn truncating_a_success_report_never_succeeds(cut in 0usize..60) {
            let full = b"TASK-START 10-A\nTASK-END 10-A 5\nSUCCESS\n";
            let cut = cut.min(full.len() - 1);
            prop_assert_ne!(verdict_of(&full[..cut]), Verdict::Success);
        }
    }
}
