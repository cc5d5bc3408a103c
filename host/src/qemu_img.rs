//! Images in qemu's formats (qcow2, vmdk, vdi, vhdx, ...), read with `qemu-img`, always with
//! an explicit `-f` so qemu never probes, and never with a backing file the user did not name.

use crate::exit::Failure;
use crate::progress::Progress;
use crate::source::SourceError;
use crate::stream::destination::{Destination, DestinationOptions};
use crate::write::WriteRequest;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Virtual (raw) size.
    pub virtual_size: u64,
    /// Backing file, if any.
    pub backing_file: Option<String>,
    /// External data file (qcow2 `data-file`), if any.
    pub data_file: Option<String>,
}

/// Parses `qemu-img info --output=json` (pure).
pub fn parse_info(json: &str) -> Result<Info, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("unreadable qemu-img info output: {e}"))?;
    let virtual_size = v["virtual-size"].as_u64().ok_or("qemu-img info reports no virtual size")?;
    let backing_file = v["full-backing-filename"].as_str().or(v["backing-filename"].as_str()).map(String::from);
    let data_file = v["format-specific"]["data"]["data-file"].as_str().map(String::from);
    Ok(Info { virtual_size, backing_file, data_file })
}

/// Runs `qemu-img info` on `path` as `format`.
pub fn info(path: &Path, format: &str) -> Result<Info, Failure> {
    let name = path.display().to_string();
    let out = duct::cmd!("qemu-img", "info", "--output=json", "-f", format, path)
        .stderr_capture()
        .stdout_capture()
        .unchecked()
        .run()
        .map_err(|e| Failure::environment(format!("cannot run qemu-img (install qemu-utils): {e}")))?;
    if !out.status.success() {
        return Err(SourceError::Unsupported {
            name,
            reason: format!("qemu-img cannot read it as {format}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        }
        .into());
    }
    let info = parse_info(&String::from_utf8_lossy(&out.stdout))
        .map_err(|reason| SourceError::Unsupported { name: name.clone(), reason })?;
    // A truncated or damaged image reads as zeros where its tables point past the end: ask
    // qemu-img check (exit 2: corrupt, 1: could not check; 3 = leaks only and 63 = no checker
    // for this format are fine).
    let check = duct::cmd!("qemu-img", "check", "-q", "-f", format, path)
        .stderr_capture()
        .stdout_capture()
        .unchecked()
        .run()
        .map_err(|e| Failure::environment(format!("cannot run qemu-img: {e}")))?;
    if matches!(check.status.code(), Some(1) | Some(2) | None) {
        let detail = String::from_utf8_lossy(&check.stdout)
            .lines()
            .chain(String::from_utf8_lossy(&check.stderr).lines())
            .take(3)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(SourceError::Unsupported {
            name,
            reason: format!("the {format} image is truncated or corrupt (qemu-img check: {detail})"),
        }
        .into());
    }
    Ok(info)
}

/// Parses qemu-img's `-p` progress (`    (12.34/100%)`) into a fraction of 100.
pub fn parse_progress(text: &str) -> Option<f64> {
    let start = text.rfind('(')?;
    let end = text[start..].find("/100%")? + start;
    text[start + 1..end].trim().parse().ok()
}

/// Converts `path` onto the request's target; returns the bytes written.
pub fn convert(
    req: &WriteRequest,
    path: &Path,
    format: &'static str,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<u64, Failure> {
    let name = path.display().to_string();
    let info = info(path, format)?;
    if let Some(backing) = &info.backing_file {
        let allowed = req.backing_file.as_ref().is_some_and(|b| {
            Path::new(backing) == b.as_path() || std::fs::canonicalize(b).ok() == std::fs::canonicalize(backing).ok()
        });
        if !allowed {
            return Err(SourceError::Unsupported {
                name,
                reason: format!("it has the backing file {backing}, which could be any host file: pass --backing-file {backing} if you mean it, or flatten the image"),
            }
            .into());
        }
    }
    if let Some(data) = &info.data_file {
        return Err(SourceError::Unsupported {
            name,
            reason: format!(
                "it keeps its data in the external file {data}: convert it to a self-contained image first"
            ),
        }
        .into());
    }
    progress.image_info(
        serde_json::json!({"source": name, "format": format, "size": info.virtual_size, "target": req.target}),
    );
    let dest = Destination::open(
        &req.target,
        Some(info.virtual_size),
        Some(path),
        &DestinationOptions { force: req.force, size: req.size },
    )?;
    let target: PathBuf = dest.write_path().to_owned();
    let mut args: Vec<String> =
        vec!["convert".into(), "-p".into(), "-f".into(), format.into(), "-O".into(), "raw".into()];
    // Direct I/O, out-of-order writes, 8 coroutines: qemu-img's fastest setting.
    args.extend([
        "-t".into(),
        if dest.is_direct() { "none".into() } else { "writeback".into() },
        "-W".into(),
        "-m".into(),
        "8".into(),
        "-n".into(),
    ]);
    if dest.is_new_file() {
        args.push("--target-is-zero".into());
    }
    args.push(path.display().to_string());
    args.push(target.display().to_string());
    let mut reader = duct::cmd("qemu-img", &args)
        .stderr_to_stdout()
        .unchecked()
        .reader()
        .map_err(|e| Failure::environment(format!("cannot run qemu-img (install qemu-utils): {e}")))?;
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if cancel.load(Ordering::Relaxed) {
            let _ = reader.kill();
            return Err(crate::stream::StreamError::Cancelled.into());
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(Failure::bad_input(format!(
                    "qemu-img failed converting {name}: {e}; {}",
                    String::from_utf8_lossy(&output).trim()
                )))
            }
        };
        output.extend_from_slice(&buf[..n]);
        if let Some(p) = parse_progress(&String::from_utf8_lossy(&output[output.len().saturating_sub(64)..])) {
            progress.copy_progress((p / 100.0 * info.virtual_size as f64) as u64, Some(info.virtual_size));
        }
        if output.len() > 1 << 20 {
            output.drain(..output.len() - 4096);
        }
    }
    let succeeded = matches!(reader.try_wait(), Ok(Some(out)) if out.status.success());
    if !succeeded {
        return Err(Failure::bad_input(format!(
            "qemu-img could not convert {name}: {}",
            String::from_utf8_lossy(&output).trim()
        )));
    }
    progress.copy_progress(info.virtual_size, Some(info.virtual_size));
    dest.commit(info.virtual_size).map_err(|e| Failure::environment(e.to_string()))?;
    Ok(info.virtual_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parsing() {
        let plain = r#"{"virtual-size": 1073741824, "filename": "a.qcow2", "format": "qcow2"}"#;
        assert_eq!(parse_info(plain).unwrap(), Info { virtual_size: 1 << 30, backing_file: None, data_file: None });
        let backed =
            r#"{"virtual-size": 10, "backing-filename": "/etc/shadow", "full-backing-filename": "/etc/shadow"}"#;
        assert_eq!(parse_info(backed).unwrap().backing_file.as_deref(), Some("/etc/shadow"));
        let data = r#"{"virtual-size": 10, "format-specific": {"type": "qcow2", "data": {"data-file": "/dev/sda"}}}"#;
        assert_eq!(parse_info(data).unwrap().data_file.as_deref(), Some("/dev/sda"));
        assert!(parse_info("{}").is_err());
        assert!(parse_info("garbage").is_err());
    }

    #[test]
    fn progress_parsing() {
        assert_eq!(parse_progress("    (0.00/100%)\r    (12.50/100%)\r"), Some(12.5));
        assert_eq!(parse_progress("no progress"), None);
    }
}
