//! The helper VM's console (serial 0): its lines, each capped (the guest decides how long
//! they are), and the lines tasks printed, as the helper logs them.

use imgforge_protocol::report::{ReportLine, ReportLineError};

pub use imgforge_protocol::line::{read_line_capped, MAX_LINE_BYTES, TRUNCATED_MARK};

/// The task and the line of a console line the helper logged for a task (`[TASK] LINE`, as
/// `forward_output` in `helper/src/tasks.rs` writes it), if it is one (pure).
pub fn task_output(console_line: &str) -> Option<(&str, &str)> {
    let (task, line) = console_line.strip_prefix('[')?.split_once("] ")?;
    let is_task = !task.is_empty() && task.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    is_task.then_some((task, line))
}

/// A line that claims to be a `CHECK` result (first word `CHECK`) but does not parse as one:
/// the parse error naming it, else `None` (pure). Such a claim must fail `verify`, never vanish.
pub fn malformed_check(line: &str) -> Option<ReportLineError> {
    let trimmed = line.trim_end_matches(['\r', '\n']);
    if trimmed != "CHECK" && !trimmed.starts_with("CHECK ") {
        return None;
    }
    match ReportLine::parse(trimmed) {
        Ok(ReportLine::Check { .. }) => None,
        Ok(_) => Some(ReportLineError::Malformed { keyword: "CHECK", line: trimmed.chars().take(200).collect() }),
        Err(e) => Some(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_output_and_check_claims() {
        assert_eq!(task_output("[70-CheckPackages] CHECK ok x \"y\""), Some(("70-CheckPackages", "CHECK ok x \"y\"")));
        assert_eq!(task_output("[  1.0] kernel"), None);
        assert_eq!(task_output("plain"), None);
        assert!(malformed_check("CHECK ok package-x \"1.0\"").is_none());
        assert!(malformed_check("CHECKS are fine").is_none());
        assert!(malformed_check("fsck: CHECK ok").is_none());
        for bad in ["CHECK", "CHECK ok", "CHECK ok a/b \"y\"", "CHECK maybe x \"y\"", "CHECK ok x unquoted"] {
            assert!(malformed_check(bad).is_some(), "{bad:?}");
        }
        assert!(malformed_check("CHECK ok x \"y\"\r").is_none(), "a serial line's \\r is not part of it");
    }
}
