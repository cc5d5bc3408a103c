//! Text from the helper VM made safe to print: the console and the task output in report
//! messages come from programs in a hostile image, and a terminal obeys escape sequences.

use std::borrow::Cow;

/// `text` with every control character but tab and newline written as a visible escape
/// (`\u{1b}`, `\r`), so that nothing the guest prints can move the cursor, retitle the window
/// or hide text (pure).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn is_unsafe(c: char) -> bool {
    c.is_control() && c != '\t' && c != '\n'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_reach_the_terminal_only_as_text() {
        let cases: &[(&str, &str)] = &[
            ("plain text\twith a tab", "plain text\twith a tab"),
            ("\u{1b}[2J\u{1b}]0;owned\u{7}", "\\u{1b}[2J\\u{1b}]0;owned\\u{7}"),
            ("carriage\rreturn", "carriage\\rreturn"),
            ("C1 \u{9b}31m", "C1 \\u{9b}31m"),
            ("délétère ✓", "délétère ✓"),
            ("an error tail\nof two lines", "an error tail\nof two lines"),
        ];
        for (line, want) in cases {
            assert_eq!(printable(line), *want, "{line:?}");
        }
        assert!(matches!(printable("ok"), Cow::Borrowed(_)));
    }
}
