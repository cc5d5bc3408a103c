//! Host programs for the initramfs, with the shared libraries `ldd` says they need.

use super::BuildError;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Parses `ldd` output into the absolute paths of the libraries (and loader) it lists.
pub fn parse_ldd(output: &str) -> Vec<PathBuf> {
    output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The listed programs plus every library they load (the closure `ldd` reports).
pub fn closure(programs: &[PathBuf]) -> Result<BTreeSet<PathBuf>, BuildError> {
    let mut files = BTreeSet::new();
    for program in programs {
        if !program.is_file() {
            return Err(BuildError::MissingTool(program.clone()));
        }
        files.insert(program.clone());
        // ldd exits non-zero for static binaries and scripts: they need no libraries.
        let out = duct::cmd!("ldd", program)
            .stderr_null()
            .stdout_capture()
            .unchecked()
            .run()
            .map_err(|e| BuildError::Tool { tool: format!("ldd {}", program.display()), reason: e.to_string() })?;
        if out.status.success() {
            files.extend(parse_ldd(&String::from_utf8_lossy(&out.stdout)));
        }
    }
    Ok(files)
}

/// Reads a recipe list: one entry a line, `#` comments and blank lines ignored.
pub fn parse_list(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
\tlibblkid.so.1 => /lib/x86_64-linux-gnu/libblkid.so.1 (0x00007f)\n\
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
\tlibmissing.so => not found\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libblkid.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn lists() {
        assert_eq!(parse_list("# c\n\n /bin/a \n/bin/b # not stripped\n"), ["/bin/a", "/bin/b # not stripped"]);
    }
}
