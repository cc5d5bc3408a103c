//! The Debian package (`scripts/package.sh`), lintian clean, installed by dpkg into a throwaway
//! root (`dpkg --root`, dependencies not installed there): the installed program runs, its man
//! pages are found by man and say what `--help` says, the bash completion completes, the Ganeti
//! OS definition and the conffile are in place; a purge leaves nothing of it behind.

use imgforge_tests::fixtures::{self, sh};
use imgforge_tests::package::build_deb;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `dpkg --root ROOT ARGS`: maintainer scripts run outside the root (it has no shell), with
/// DPKG_ROOT telling them where it is.
fn dpkg(root: &Path, args: &[&str]) -> String {
    sh(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--log=/dev/null"])
        .args(args))
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Every path under `root`, relative, apart from dpkg's own database.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            if rel.starts_with("var/lib/dpkg") {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            }
            out.insert(rel);
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// The alphanumeric words of `text`, lowercased: what a help text and a man page rendering of
/// it share, whatever the line breaks, hyphens and quotes.
fn words(text: &str) -> String {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The help paragraphs of `imgforge help SUB` (each option's text, joined across lines).
fn help_paragraphs(help: &str) -> Vec<String> {
    let mut paragraphs = Vec::new();
    let mut current = String::new();
    for line in help.lines() {
        let trimmed = line.trim();
        // An option line ("  -a, --add <DISK>") starts a paragraph; headings and blanks end one.
        if trimmed.is_empty() || !line.starts_with(' ') || trimmed.starts_with('-') {
            if !current.trim().is_empty() {
                paragraphs.push(words(&current));
            }
            current.clear();
            continue;
        }
        // Clap's "[default: ...]" and "[possible values: ...]" stand elsewhere on the man page.
        let text =
            ["[default: ", "[possible values: "].iter().fold(trimmed, |t, meta| t.find(meta).map_or(t, |i| &t[..i]));
        current.push(' ');
        current.push_str(text);
    }
    if !current.trim().is_empty() {
        paragraphs.push(words(&current));
    }
    paragraphs
}

#[test]
fn the_package_installs_runs_and_purges_without_a_trace() {
    fixtures::require_root();
    let out = tempfile::tempdir().unwrap();
    let deb = build_deb(out.path(), true);
    assert!(deb.file_name().unwrap().to_string_lossy().ends_with("_amd64.deb"), "{}", deb.display());
    let fields = sh(Command::new("dpkg-deb").arg("--field").arg(&deb)).unwrap();
    eprintln!("{fields}");
    for want in
        ["Package: imgforge", "qemu-system-x86", "qemu-utils", "busybox-static", "libc6 (>= ", "Suggests: ganeti"]
    {
        assert!(fields.contains(want), "control lacks {want}");
    }
    assert!(!fields.lines().any(|l| l.starts_with("Depends:") && l.contains("ganeti")), "ganeti is only suggested");

    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    // /var/cache is the system's: the helper image cache goes in it.
    std::fs::create_dir_all(root.join("var/cache")).unwrap();
    let empty = tree(root);
    dpkg(root, &["--force-depends", "--install", deb.to_str().unwrap()]);
    let installed = tree(root);

    // The installed program.
    let imgforge = root.join("usr/bin/imgforge");
    let help = sh(Command::new(&imgforge).arg("--help")).unwrap();
    assert!(help.contains("customize") && help.contains("ganeti"), "{help}");
    assert!(!help.contains("generate"), "the packaging command stays hidden: {help}");
    let version = sh(Command::new(&imgforge).arg("--version")).unwrap();
    assert!(version.contains("commit ") && version.contains("helper image recipe "), "{version}");

    // man finds the page in the root's manpath, renders it without a warning, and it says what
    // `imgforge help customize` says, option by option.
    let manpath = root.join("usr/share/man");
    let found = sh(Command::new("man").arg("-M").arg(&manpath).args(["-w", "imgforge-customize"])).unwrap();
    assert_eq!(found.trim(), manpath.join("man1/imgforge-customize.1.gz").display().to_string());
    let rendered = Command::new("man")
        .arg("-M")
        .arg(&manpath)
        .args(["--warnings", "--no-hyphenation", "--no-justification", "-P", "cat", "imgforge-customize"])
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&rendered.stdout);
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    assert!(rendered.stderr.is_empty(), "man warns: {}", String::from_utf8_lossy(&rendered.stderr));
    for section in ["SYNOPSIS", "OPTIONS", "EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES", "SECURITY", "SEE ALSO"] {
        assert!(page.lines().any(|l| l == section), "no {section} section:\n{page}");
    }
    let page_words = words(&page);
    let customize_help = sh(Command::new(&imgforge).args(["help", "customize"])).unwrap();
    let paragraphs = help_paragraphs(&customize_help);
    assert!(paragraphs.len() > 40, "{paragraphs:?}");
    for paragraph in &paragraphs {
        assert!(
            page_words.contains(paragraph.as_str()),
            "`imgforge help customize` says {paragraph:?}, the man page does not"
        );
    }
    for page in ["imgforge", "imgforge-deploy", "imgforge-ganeti-install-os", "imgforge-helper-image-build"] {
        sh(Command::new("man").arg("-M").arg(&manpath).args(["-w", page])).unwrap();
    }

    // The bash completion, sourced as bash-completion would, completes `imgforge customize --ho`.
    let completion = root.join("usr/share/bash-completion/completions/imgforge");
    let script = r#"
        source "$1"
        spec=$(complete -p imgforge)
        fn=${spec#*-F }; fn=${fn%% *}
        COMP_WORDS=(imgforge customize --ho); COMP_CWORD=2
        COMP_LINE='imgforge customize --ho'; COMP_POINT=${#COMP_LINE}
        "$fn" imgforge --ho customize
        printf '%s\n' "${COMPREPLY[@]}"
    "#;
    let replies = sh(Command::new("bash").args(["-c", script, "bash"]).arg(&completion)).unwrap();
    assert!(replies.lines().any(|l| l == "--hostname"), "COMPREPLY: {replies:?}");
    assert!(replies.lines().all(|l| l.starts_with("--ho")), "COMPREPLY: {replies:?}");
    for other in ["usr/share/zsh/vendor-completions/_imgforge", "usr/share/fish/vendor_completions.d/imgforge.fish"] {
        let text = std::fs::read_to_string(root.join(other)).unwrap();
        assert!(text.contains("hostname"), "{other}");
    }

    // The Ganeti OS definition: what `imgforge ganeti install-os` writes, its scripts running
    // the installed binary.
    let os = root.join("srv/ganeti/os/imgforge");
    let reference = tempfile::tempdir().unwrap();
    sh(Command::new(&imgforge)
        .args(["ganeti", "install-os", "--os-dir"])
        .arg(reference.path())
        .args(["--imgforge-path", "/usr/bin/imgforge"]))
    .unwrap();
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    };
    assert_eq!(names(&os), names(&reference.path().join("imgforge")));
    for name in names(&os) {
        let (shipped, written) = (os.join(&name), reference.path().join("imgforge").join(&name));
        assert_eq!(std::fs::read(&shipped).unwrap(), std::fs::read(&written).unwrap(), "{name}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&shipped), mode(&written), "{name}");
    }
    assert_eq!(std::fs::read_to_string(os.join("ganeti_api_version")).unwrap(), "20\n");
    assert!(std::fs::read_to_string(os.join("create")).unwrap().contains("exec '/usr/bin/imgforge' ganeti create"));

    // The conffile: registered as one, every setting there and commented out.
    let conffiles = sh(Command::new("dpkg-query")
        .arg(format!("--admindir={}", root.join("var/lib/dpkg").display()))
        .args(["-W", "-f", "${Conffiles}", "imgforge"]))
    .unwrap();
    assert!(conffiles.contains("/etc/default/imgforge "), "{conffiles:?}");
    let settings = std::fs::read_to_string(root.join("etc/default/imgforge")).unwrap();
    for key in [
        "IMAGE_DIR",
        "VARIANTS_DIR",
        "HELPER_SOFT_TIMEOUT",
        "HELPER_HARD_TIMEOUT",
        "HELPER_MEMORY",
        "HELPER_USER",
        "PROGRESS_MONITOR",
        "ACCEL",
        "DHCP_TAGS",
        "STATEFUL_DHCPV6_TAGS",
        "STATELESS_DHCPV6_TAGS",
        "URL_ALLOW_PRIVATE_ADDRESSES",
        "DEFAULT_NIC_CONFIG",
    ] {
        assert!(settings.lines().any(|l| l.starts_with(&format!("#{key}="))), "{key}:\n{settings}");
    }
    assert!(settings.lines().all(|l| l.is_empty() || l.starts_with('#')), "{settings}");
    assert!(root.join("var/lib/imgforge/images").is_dir(), "the default IMAGE_DIR");

    // A purge removes what the package installed and the helper image cache imgforge made.
    let cache = root.join("var/cache/imgforge/helper-image");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("current.json"), "{}").unwrap();
    dpkg(root, &["--purge", "imgforge"]);
    let left: Vec<_> = tree(root).difference(&empty).cloned().collect();
    assert!(left.is_empty(), "left after the purge: {left:?} (installed: {})", installed.len());
    let status = sh(Command::new("dpkg-query")
        .arg(format!("--admindir={}", root.join("var/lib/dpkg").display()))
        .args(["-W", "-f", "${db:Status-Abbrev}", "imgforge"]))
    .unwrap_or_default();
    assert!(!status.starts_with("ii") && !status.starts_with("rc"), "{status:?}");
}
