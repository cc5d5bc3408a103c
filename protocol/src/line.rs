//! Lines of output whose length the producer decides (the guest's console, a task's output),
//! read with a cap so that an endless line costs bounded memory. Both sides cut the same way:
//! the helper the lines of its tasks, the host the lines of the helper's console.

use std::io::BufRead;

/// Longest line kept; the rest of a longer line is dropped and [`TRUNCATED_MARK`]
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
}
