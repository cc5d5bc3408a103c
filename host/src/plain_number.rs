//! Numbers in parameters and options written as plain digits: Rust's `str::parse` also takes a
//! leading `+` (and `-` for signed types), which no parameter here means (`ROOT_PARTITION=+3`).

use std::str::FromStr;

/// `text` as a number if it is one or more ASCII digits and nothing else, and fits `T` (pure).
pub fn parse<T: FromStr>(text: &str) -> Option<T> {
    all_digits(text, 10).then(|| text.parse().ok()).flatten()
}

/// `text` as an octal number if it is one or more octal digits and nothing else (pure).
pub fn parse_octal(text: &str) -> Option<u32> {
    all_digits(text, 8).then(|| u32::from_str_radix(text, 8).ok()).flatten()
}

fn all_digits(text: &str, radix: u32) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_digit(radix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_digits() {
        assert_eq!(parse::<u32>("3"), Some(3));
        assert_eq!(parse::<u32>("0042"), Some(42));
        assert_eq!(parse::<u8>("256"), None);
        assert_eq!(parse::<i32>("7"), Some(7));
        for bad in ["", "+3", "-3", " 3", "3 ", "3.0", "٣", "0x3", "1e3", "+"] {
            assert_eq!(parse::<u32>(bad), None, "{bad:?}");
            assert_eq!(parse::<i32>(bad), None, "{bad:?}");
        }
        assert_eq!(parse_octal("0644"), Some(0o644));
        for bad in ["", "+644", "-644", "8", "0o644", " 644"] {
            assert_eq!(parse_octal(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever is accepted is exactly the digits of the number it reads as.
        #[test]
        fn accepted_text_is_the_number_written_plainly(text in "[-+0-9 a.]{0,12}") {
            if let Some(n) = parse::<u64>(&text) {
                proptest::prop_assert_eq!(text.trim_start_matches('0').to_owned(), if n == 0 { String::new() } else { n.to_string() });
            }
        }
    }
}
