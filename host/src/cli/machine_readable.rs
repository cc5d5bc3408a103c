//! `customize --machine-readable[=FORMAT]`, in the shape of guestfs-tools' (virt-sparsify,
//! virt-resize, virt-builder): without a disk, the program's name and then what this build
//! supports, one word a line, and exit 0, so that a script can test for a feature before using
//! it. virt-customize 1.48 itself refuses the option.

use std::path::PathBuf;

/// Where the lines go: guestfs-tools' `stream:stdout` (the default), `stream:stderr`,
/// `file:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, created or truncated.
    File(PathBuf),
}

/// Parses FORMAT as guestfs-tools do; the error says what it takes.
pub fn parse(format: &str) -> Result<Output, String> {
    match format {
        "" | "stream:stdout" => Ok(Output::Stdout),
        "stream:stderr" => Ok(Output::Stderr),
        _ => match format.strip_prefix("file:") {
            Some(name) if !name.is_empty() => Ok(Output::File(PathBuf::from(name))),
            _ => Err(format!(
                "--machine-readable={format:?}: the format is stream:stdout (the default), stream:stderr or file:NAME"
            )),
        },
    }
}

/// The lines: the program's name, then each capability.
pub const CAPABILITIES: &[&str] = &[
    "imgforge",
    "customize",
    "dry-run",
    "format-raw",
    "format-qcow2",
    "password-crypto-md5",
    "password-crypto-sha256",
    "password-crypto-sha512",
    "selinux-relabel-setfiles",
    "packages-deb",
    "packages-rpm",
    "edit-perl-subset",
    "random-seed",
];

/// Writes [`CAPABILITIES`], one a line, where `output` says.
pub fn print(output: &Output) -> std::io::Result<()> {
    use std::io::Write;
    let text: String = CAPABILITIES.iter().map(|line| format!("{line}\n")).collect();
    match output {
        Output::Stdout => std::io::stdout().write_all(text.as_bytes()),
        Output::Stderr => std::io::stderr().write_all(text.as_bytes()),
        Output::File(path) => std::fs::write(path, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_guestfs_tools_take_them() {
        let ok = [
            ("", Output::Stdout),
            ("stream:stdout", Output::Stdout),
            ("stream:stderr", Output::Stderr),
            ("file:/tmp/caps", Output::File("/tmp/caps".into())),
            ("file:relative:colon", Output::File("relative:colon".into())),
        ];
        for (text, want) in ok {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
        for bad in ["stdout", "stream:", "stream:stdin", "file:", "FILE:x", "json"] {
            assert!(parse(bad).unwrap_err().contains("stream:stdout"), "{bad}");
        }
    }

    #[test]
    fn the_program_name_comes_first_and_words_are_plain() {
        assert_eq!(CAPABILITIES[0], "imgforge");
        for line in CAPABILITIES {
            assert!(
                !line.is_empty() && line.bytes().all(|b| b.is_ascii_lowercase() || b == b'-' || b.is_ascii_digit())
            );
        }
    }
}
