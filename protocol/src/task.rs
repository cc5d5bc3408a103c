//! Task names and their run-parts order.

use thiserror::Error;

/// Why a task file name is not acceptable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TaskNameError {
    /// The name does not have the `NN-Name` shape.
    #[error("task name {0:?} is not of the form NN-Name (two digits, a dash, then letters, digits, '-' or '_')")]
    Shape(String),
}

/// A task script's file name, `NN-Name`, as run-parts accepts it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskName(String);

impl TaskName {
    /// Validates `name` (`NN-Name`, run-parts' character set only).
    pub fn parse(name: &str) -> Result<Self, TaskNameError> {
        let bytes = name.as_bytes();
        let ok = bytes.len() > 3
            && bytes[0].is_ascii_digit()
            && bytes[1].is_ascii_digit()
            && bytes[2] == b'-'
            && bytes[3..].iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(TaskNameError::Shape(name.to_owned()))
        }
    }

    /// The full file name, `NN-Name`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name without its order prefix (`MountRoot` for `10-MountRoot`), as used by
    /// `EXCLUDE_TASK_<Name>`.
    pub fn short(&self) -> &str {
        &self.0[3..]
    }
}

impl std::fmt::Display for TaskName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Orders file names like run-parts: names that are not valid task names are skipped, the rest
/// sorted bytewise (the C locale).
pub fn run_parts_order<I, S>(names: I) -> Vec<TaskName>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut tasks: Vec<TaskName> = names.into_iter().filter_map(|n| TaskName::parse(n.as_ref()).ok()).collect();
    tasks.sort();
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_parts_order_sorts_and_skips_invalid() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["50-Customize", "10-MountRoot", "90-Unmount"], &["10-MountRoot", "50-Customize", "90-Unmount"]),
            (&["10-A", "10-B", "09-Z"], &["09-Z", "10-A", "10-B"]),
            // run-parts skips editor backups, dotfiles and names with dots.
            (&["10-A~", ".10-A", "10-A.sh", "README", "1-A", "10-"], &[]),
            // bytewise: upper case before lower case.
            (&["10-b", "10-B"], &["10-B", "10-b"]),
        ];
        for (input, want) in cases {
            let got: Vec<String> = run_parts_order(input.iter()).iter().map(|t| t.to_string()).collect();
            assert_eq!(&got, want, "input {input:?}");
        }
    }

    #[test]
    fn short_name_drops_prefix() {
        assert_eq!(TaskName::parse("10-MountRoot").unwrap().short(), "MountRoot");
    }
}
