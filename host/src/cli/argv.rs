//! Scrubbing passwords given on the command line out of this process's visible argv.
//!
//! `--root-password password:PW` (virt-customize's grammar) puts a secret on the command line,
//! where `/proc/PID/cmdline` shows it to every user. Once parsed, the clear text is overwritten
//! in place, so only the moment between exec and this call exposes it; `file:PATH` avoids
//! even that.

/// Options whose value may hold a clear-text password.
const SECRET_OPTIONS: &[&str] = &["--root-password", "--password"];
/// Options whose whole value is a secret (`build --seed`: it fixes every salt and random
/// password of the build).
const WHOLE_SECRET_OPTIONS: &[&str] = &["--seed"];

/// Byte ranges (within the NUL-separated argv block) that hold clear-text passwords (pure).
pub fn secret_ranges(block: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut offset = 0;
    let mut previous: &[u8] = b"";
    for arg in block.split(|b| *b == 0) {
        let value_start = if SECRET_OPTIONS.iter().any(|o| previous == o.as_bytes()) {
            Some(0)
        } else {
            SECRET_OPTIONS.iter().find_map(|o| {
                let prefix = format!("{o}=");
                arg.starts_with(prefix.as_bytes()).then_some(prefix.len())
            })
        };
        let whole_start = if WHOLE_SECRET_OPTIONS.iter().any(|o| previous == o.as_bytes()) {
            Some(0)
        } else {
            WHOLE_SECRET_OPTIONS.iter().find_map(|o| {
                let prefix = format!("{o}=");
                arg.starts_with(prefix.as_bytes()).then_some(prefix.len())
            })
        };
        if let Some(start) = whole_start.filter(|s| *s < arg.len()) {
            ranges.push(offset + start..offset + arg.len());
        } else if let Some(start) = value_start {
            let value = &arg[start..];
            let marker = b"password:";
            if let Some(pos) = value.windows(marker.len()).position(|w| w == marker) {
                let from = offset + start + pos + marker.len();
                if from < offset + arg.len() {
                    ranges.push(from..offset + arg.len());
                }
            }
        }
        previous = arg;
        offset += arg.len() + 1;
    }
    ranges
}

/// Overwrites clear-text passwords in this process's argv memory with `*`.
pub fn scrub() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    // Fields after the parenthesized command name; arg_start and arg_end are fields 48 and 49.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (Some(start), Some(end)) =
        (fields.get(45).and_then(|v| v.parse::<usize>().ok()), fields.get(46).and_then(|v| v.parse::<usize>().ok()))
    else {
        return;
    };
    if end <= start || end - start > 1 << 20 {
        return;
    }
    // SAFETY: [arg_start, arg_end) is this process's own argument block, mapped writable on
    // the initial stack; nothing else holds references into it (Rust copied argv at start).
    let block = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    for range in secret_ranges(block) {
        block[range].fill(b'*');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubbed(args: &[&str]) -> String {
        let mut block: Vec<u8> = args.join("\0").into_bytes();
        block.push(0);
        for r in secret_ranges(&block) {
            block[r].fill(b'*');
        }
        String::from_utf8(block).unwrap().replace('\0', " ")
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            scrubbed(&["imgforge", "--root-password", "password:abc", "--hostname", "h"]),
            "imgforge --root-password password:*** --hostname h "
        );
        assert_eq!(
            scrubbed(&["x", "--password", "alice:locked:password:pw"]),
            "x --password alice:locked:password:** "
        );
        assert_eq!(scrubbed(&["x", "--root-password=password:pw"]), "x --root-password=password:** ");
        assert_eq!(
            scrubbed(&["x", "--root-password", "file:/p", "--write", "/f:password:keep"]),
            "x --root-password file:/p --write /f:password:keep "
        );
        assert_eq!(scrubbed(&["x", "build", "--seed", "s3", "r.toml"]), "x build --seed ** r.toml ");
        assert_eq!(scrubbed(&["x", "build", "--seed=s3", "--seed="]), "x build --seed=** --seed= ");
    }
}
