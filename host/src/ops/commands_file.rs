//! virt-customize's `--commands-from-file` syntax: one option a line, without its `--`.
//!
//! ```text
//! # comment
//! hostname web1
//! run-command echo one \
//!     two
//! selinux-relabel
//! ```
//! The argument is the rest of the line after the first space (not split further); a line
//! ending in `\` continues on the next.

use thiserror::Error;

/// A syntax error in a commands file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CommandsFileError {
    /// The file ends inside a continued line.
    #[error("line {0}: the file ends after a '\\' continuation")]
    DanglingContinuation(usize),
    /// A line that starts with `-`.
    #[error("line {line}: write the option without leading dashes ({text:?})")]
    Dashes {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// One command read from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCommand {
    /// 1-based number of the line it starts on.
    pub line: usize,
    /// The option name, without `--`.
    pub name: String,
    /// Its argument, if any.
    pub arg: Option<String>,
}

/// Parses a commands file.
pub fn parse(text: &str) -> Result<Vec<FileCommand>, CommandsFileError> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        let (start, mut joined) = match pending.take() {
            Some((start, acc)) => (start, acc + raw),
            None => {
                let trimmed = raw.trim_start();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                (number, trimmed.to_owned())
            }
        };
        if joined.ends_with('\\') {
            joined.pop();
            pending = Some((start, joined + "\n"));
            continue;
        }
        if joined.starts_with('-') {
            return Err(CommandsFileError::Dashes { line: start, text: joined });
        }
        let (name, arg) = match joined.split_once(' ') {
            Some((n, a)) => (n.to_owned(), Some(a.to_owned())),
            None => (joined.trim_end().to_owned(), None),
        };
        out.push(FileCommand { line: start, name, arg });
    }
    match pending {
        Some((start, _)) => Err(CommandsFileError::DanglingContinuation(start)),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: usize, name: &str, arg: Option<&str>) -> FileCommand {
        FileCommand { line, name: name.into(), arg: arg.map(Into::into) }
    }

    #[test]
    fn parse_table() {
        let cases: &[(&str, Vec<FileCommand>)] = &[
            ("", vec![]),
            ("# c\n\n   \nhostname web1\n", vec![cmd(4, "hostname", Some("web1"))]),
            (
                "run-command echo a  b\nselinux-relabel\n",
                vec![cmd(1, "run-command", Some("echo a  b")), cmd(2, "selinux-relabel", None)],
            ),
            (
                "run-command echo one \\\n two\nmkdir /x",
                vec![cmd(1, "run-command", Some("echo one \n two")), cmd(3, "mkdir", Some("/x"))],
            ),
            ("  write /f:a # not a comment", vec![cmd(1, "write", Some("/f:a # not a comment"))]),
        ];
        for (text, want) in cases {
            assert_eq!(&parse(text).unwrap(), want, "{text:?}");
        }
        assert_eq!(parse("mkdir /x\nrun-command a \\"), Err(CommandsFileError::DanglingContinuation(2)));
        assert!(matches!(parse("--hostname x"), Err(CommandsFileError::Dashes { line: 1, .. })));
    }
}
