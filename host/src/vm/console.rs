//! The helper VM's console (serial 0): its lines, each capped (the guest decides how long
//! they are), and the lines tasks printed, as the helper logs them.

use imgforge_protocol::report::{ReportLine, ReportLineError};
use std::io::BufRead;

/// Longest console line kept; the rest of a longer line is dropped and [`TRUNCATED_MARK`]
/// ends what is kept.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// What ends a line cut at [`MAX_LINE_BYTES`].
pub const TRUNCATED_MARK: &str = " [... rest of the line dropped]";

/// Reads the next line of `reader` into `line` (cleared first, without its `\n`), keeping at
/// most `max` bytes of it, then [`TRUNCATED_MARK`] if there was more. Returns false at the
/// end of the stream with nothing read. Memory stays bounded whatever the line's length.
pub fn read_line_capped(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> std::io::Result<bool> {
    line.clear();
    let (mut read_any, mut cut) = (false, false);
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            break;
        }
        read_any = true;
        let newline = buf.iter().position(|b| *b == b'\n');
        let body = &buf[..newline.unwrap_or(buf.len())];
        let room = max.saturating_sub(line.len());
        cut |= body.len() > room;
        line.extend_from_slice(&body[..body.len().min(room)]);
        let used = newline.map_or(buf.len(), |at| at + 1);
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if cut {
        line.extend_from_slice(TRUNCATED_MARK.as_bytes());
    }
    Ok(read_any)
}

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
    use std::io::BufReader;

    #[test]
    fn lines_are_capped_and_the_rest_dropped() {
        let mut input = vec![b'a'; 3 << 20];
        input.extend_from_slice(b"\nnext\r\nlast");
        let mut reader = BufReader::with_capacity(4096, &input[..]);
        let mut line = Vec::new();
        assert!(read_line_capped(&mut reader, &mut line, MAX_LINE_BYTES).unwrap());
        assert_eq!(line.len(), MAX_LINE_BYTES + TRUNCATED_MARK.len());
        assert!(line.ends_with(TRUNCATED_MARK.as_bytes()));
        assert!(line.capacity() <= 2 * MAX_LINE_BYTES, "the dropped part was held: {}", line.capacity());
        assert!(read_line_capped(&mut reader, &mut line, MAX_LINE_BYTES).unwrap());
        assert_eq!(line, b"next\r");
        assert!(read_line_capped(&mut reader, &mut line, MAX_LINE_BYTES).unwrap());
        assert_eq!(line, b"last");
        assert!(!read_line_capped(&mut reader, &mut line, MAX_LINE_BYTES).unwrap());
        // Exactly at the cap: nothing is dropped, no mark.
        let exact = [vec![b'b'; 10], b"\n".to_vec()].concat();
        assert!(read_line_capped(&mut &exact[..], &mut line, 10).unwrap());
        assert_eq!(line, vec![b'b'; 10]);
    }

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
