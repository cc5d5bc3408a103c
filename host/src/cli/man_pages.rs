//! Manual pages from the clap definitions: `imgforge(1)` and one page a subcommand
//! (`imgforge-customize(1)`, `imgforge-ganeti-install-os(1)`, ...), clap_mangen's sections
//! followed by the ones a person needs beyond `--help`: exit statuses, environment, files,
//! examples, security notes. The option texts are clap's, so `imgforge help customize` and
//! `man imgforge-customize` say the same.

use crate::cli::exit::ExitStatus;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;
use std::path::{Path, PathBuf};

/// Every exit status with its meaning (a match, so a new status fails to compile here).
fn exit_statuses() -> Vec<(ExitStatus, &'static str)> {
    let all = [
        ExitStatus::Success,
        ExitStatus::CustomizationFailed,
        ExitStatus::BadInput,
        ExitStatus::Timeout,
        ExitStatus::Environment,
        ExitStatus::Interrupted,
    ];
    all.into_iter()
        .map(|status| {
            let meaning = match status {
                ExitStatus::Success => "Success.",
                ExitStatus::CustomizationFailed => {
                    "A task failed in the helper VM (named, with its message), or verify found the image bad. \
                     The disk is left as it was."
                }
                ExitStatus::BadInput => "Bad usage or bad input (an option, an image, a Ganeti parameter), named.",
                ExitStatus::Timeout => "The helper VM timed out (--timeout, HELPER_SOFT_TIMEOUT).",
                ExitStatus::Environment => {
                    "An environment problem: qemu missing, the helper image cannot be built, no space, \
                     permissions."
                }
                ExitStatus::Interrupted => {
                    "Interrupted by SIGINT, SIGTERM or SIGHUP; what the command made is removed."
                }
            };
            (status, meaning)
        })
        .collect()
}

/// Environment variables imgforge reads.
const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "IMGFORGE_CACHE_DIR",
        "Where the helper image (kernel, initramfs) and the kernel package it is built from are kept. \
         Default: /var/cache/imgforge for root, else $XDG_CACHE_HOME/imgforge or ~/.cache/imgforge.",
    ),
    (
        "IMGFORGE_KERNEL_DEB",
        "A linux-image-*-amd64 package file to build the helper image from, instead of apt-get download.",
    ),
    ("IMGFORGE_GANETI_CONFIG", "The Ganeti OS settings file, instead of /etc/default/imgforge."),
    ("TMPDIR", "Where work directories (0700) are made; leftovers of a killed imgforge are removed by the next run."),
    ("RUST_LOG", "Logging filter (tracing's syntax), instead of what -v and -q choose."),
    (
        "OSP_*, INSTANCE_NAME, DISK_0_PATH, NIC_*, ...",
        "What Ganeti passes to the OS scripts (imgforge ganeti create, import, export, rename, verify); \
         see parameters.list in the OS definition.",
    ),
];

/// Files imgforge reads or writes.
const FILES: &[(&str, &str)] = &[
    (
        "/etc/default/imgforge",
        "Settings of the Ganeti OS definition (IMAGE_DIR, VARIANTS_DIR, HELPER_SOFT_TIMEOUT, HELPER_HARD_TIMEOUT, \
         HELPER_MEMORY, HELPER_USER, PROGRESS_MONITOR, ACCEL, DHCP_TAGS, STATEFUL_DHCPV6_TAGS, \
         STATELESS_DHCPV6_TAGS, DEFAULT_NIC_CONFIG; the package's copy describes each): KEY=value lines, \
         read, never executed.",
    ),
    (
        "/srv/ganeti/os/imgforge/",
        "The Ganeti OS definition (imgforge ganeti install-os writes it; the package ships it).",
    ),
    ("/var/lib/imgforge/images/", "The default IMAGE_DIR, where Ganeti's img_id names are looked up."),
    ("/var/cache/imgforge/", "The helper image cache of root (see IMGFORGE_CACHE_DIR)."),
    ("/run/imgforge/uid/", "Locks reserving the uid each qemu runs as (HELPER_USER=dynamic)."),
];

/// The README's examples, with the subcommand each belongs to ("" for the whole program).
const EXAMPLES: &[(&str, &str, &str)] = &[
    (
        "customize",
        "Set the hostname, the root password and an SSH key, upload a file, run a command, set the time zone \
         and add a first-boot script, in the order given:",
        "imgforge customize -a disk.img \\\n    --hostname web1 --root-password password:s3cret \\\n    \
         --ssh-inject root:file:/root/.ssh/id_ed25519.pub \\\n    --upload ./app.conf:/etc/app/ \
         --run-command 'systemctl enable app' \\\n    --timezone Europe/Athens --firstboot ./register.sh",
    ),
    (
        "customize",
        "Show what a customization would change, leaving the disk untouched:",
        "imgforge customize -a disk.img --hostname web1 --dry-run",
    ),
    (
        "write",
        "Stream an image onto a new 10 GiB file, checking its SHA-256:",
        "imgforge write --image SRC --target DEST --size 10G --sha256 HEX",
    ),
    ("deploy", "Write, then customize:", "imgforge deploy --image SRC --target DEST --hostname web1"),
    (
        "deploy",
        "Customize a liveimg into another:",
        "imgforge deploy --image live.img --target site.img --target-format liveimg --hostname web1",
    ),
    ("inspect", "Partition tables and filesystems, nothing booted:", "imgforge inspect IMAGE --json"),
    (
        "verify",
        "Check the filesystems and that a package is installed:",
        "imgforge verify IMAGE --require-package openssh-server",
    ),
    (
        "verify",
        "Check that an image is the one a build's provenance statement names:",
        "imgforge verify --provenance out/ath-web.img.provenance.json out/ath-web.img",
    ),
    (
        "build",
        "Build every variant of a recipe, two helper VMs side by side, into out/:",
        "imgforge build sites.toml --jobs 2 --out-dir out",
    ),
    ("helper-image", "Build the helper image ahead of the first run:", "imgforge helper-image build"),
    (
        "ganeti",
        "Write the Ganeti OS definition (the package ships it already), then add an instance:",
        "imgforge ganeti install-os --os-dir /srv/ganeti/os\ngnt-instance add -o imgforge+default \
         -O img_id=debian,img_passwd=... -t file ... inst1",
    ),
];

/// The security notes (the README's "what imgforge promises", in short).
const SECURITY: &[&str] = &[
    "The image, its URL's server and Ganeti's parameters are treated as hostile. No C code on the host reads \
     image data and nothing from the image is mounted on the host: partition tables, superblocks and image \
     headers are parsed in Rust, filesystems are mounted only inside the helper VM.",
    "No host file is reachable from an image: backing files (unless named with --backing-file), external data \
     files, json: names and multi-file VMDKs are refused; a Ganeti disk is always raw; block devices are \
     opened O_EXCL.",
    "qemu runs confined: as a uid and gid of its own (HELPER_USER=dynamic) or --helper-user USER, under \
     -sandbox on, with a cleared environment, only the descriptors passed to it, no network, and a \
     parent-death signal. With a named USER, every other process of that user can reach the job's qemu: \
     name a dedicated user, never nobody.",
    "Guest programs (--run, --run-command, package managers) run chrooted in the helper VM with their own /dev, \
     capabilities dropped: they cannot forge the result. File operations resolve every path inside the guest \
     root.",
    "Secrets never reach argv, another process's environment, logs or world-readable files: passwords are \
     hashed on the host; URLs are shown with credentials as ***.",
    "Outputs appear only when complete; a failed customization leaves the disk byte-identical. What is not \
     promised: the helper VM (its kernel and imgforge-helper) is trusted code.",
];

/// A page's name (`imgforge-customize`) and the subcommand path it documents (`customize`).
fn pages(root: &clap::Command) -> Vec<(clap::Command, String)> {
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(clap::Command, String)>) {
        out.push((cmd.clone(), path.to_owned()));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let sub_path =
                if path.is_empty() { sub.get_name().to_owned() } else { format!("{path} {}", sub.get_name()) };
            walk(sub, &sub_path, out);
        }
    }
    let mut root = root.clone().disable_help_subcommand(true);
    root.build();
    let mut out = Vec::new();
    walk(&root, "", &mut out);
    out.into_iter().map(|(cmd, path)| (with_aliases(cmd), path)).collect()
}

/// `cmd` with each option's visible aliases (`--memsize`, `--colours`) in its text, as `--help`
/// shows them: clap_mangen leaves them out.
fn with_aliases(mut cmd: clap::Command) -> clap::Command {
    let ids: Vec<clap::Id> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
    for id in ids {
        cmd = cmd.mut_arg(id, |arg| {
            let mut aliases: Vec<String> =
                arg.get_visible_short_aliases().unwrap_or_default().iter().map(|c| format!("-{c}")).collect();
            aliases.extend(arg.get_visible_aliases().unwrap_or_default().iter().map(|a| format!("--{a}")));
            if aliases.is_empty() {
                return arg;
            }
            let text = arg.get_long_help().or(arg.get_help()).map(|t| t.to_string()).unwrap_or_default();
            let label = if aliases.len() == 1 { "alias" } else { "aliases" };
            arg.long_help(format!("{text} [{label}: {}]", aliases.join(", ")))
        });
    }
    cmd
}

/// A definition list item: the term in bold, then its text.
fn item(roff: &mut Roff, term: &str, text: &str) {
    roff.control("TP", []);
    roff.text([bold(term)]);
    roff.text([roman(text)]);
}

/// The whole page of `cmd`, documenting the subcommand `path` of imgforge.
fn render(cmd: clap::Command, path: &str, all_pages: &[String]) -> std::io::Result<Vec<u8>> {
    let version = env!("CARGO_PKG_VERSION");
    let man = Man::new(cmd.clone()).source(format!("imgforge {version}")).manual("imgforge manual");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut out)?;
    }

    let mut roff = Roff::new();
    roff.control("SH", ["EXIT STATUS"]);
    for (status, meaning) in exit_statuses() {
        item(&mut roff, &(status as u8).to_string(), meaning);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, meaning) in ENVIRONMENT {
        item(&mut roff, name, meaning);
    }
    roff.control("SH", ["FILES"]);
    for (name, meaning) in FILES {
        item(&mut roff, name, meaning);
    }
    let top = path.split(' ').next().unwrap_or_default();
    let examples: Vec<_> = EXAMPLES.iter().filter(|(sub, _, _)| path.is_empty() || *sub == top).collect();
    if !examples.is_empty() {
        roff.control("SH", ["EXAMPLES"]);
        for (_, what, example) in examples {
            roff.control("PP", []);
            roff.text([roman(*what)]);
            roff.control("PP", []);
            roff.control("RS", ["4"]);
            roff.control("nf", []);
            for line in example.lines() {
                roff.text([roman(line)]);
            }
            roff.control("fi", []);
            roff.control("RE", []);
        }
    }
    roff.control("SH", ["SECURITY"]);
    for (i, note) in SECURITY.iter().enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        roff.text([roman(*note)]);
    }
    roff.control("SH", ["VERSION"]);
    roff.text([roman(super::version())]);
    roff.control("SH", ["SEE ALSO"]);
    let own = cmd.get_display_name().unwrap_or(cmd.get_name()).to_owned();
    let mut see_also: Vec<String> = all_pages.iter().filter(|p| **p != own).map(|p| format!("{p}(1)")).collect();
    see_also.extend(["virt-customize(1)", "qemu-img(1)", "gnt-os(8)", "gnt-instance(8)"].map(String::from));
    let last = see_also.len() - 1;
    for (i, page) in see_also.iter().enumerate() {
        let (name, section) = page.split_once('(').expect("name(section)");
        roff.text([bold(name), roman(format!("({section}{}", if i < last { "," } else { "" }))]);
    }
    roff.to_writer(&mut out)?;
    Ok(out)
}

/// Writes every page into `dir` as `NAME.1`; returns their paths.
pub fn write_all(root: &clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let pages = pages(root);
    let names: Vec<String> =
        pages.iter().map(|(cmd, _)| cmd.get_display_name().unwrap_or(cmd.get_name()).to_owned()).collect();
    let mut written = Vec::new();
    for ((cmd, path), name) in pages.into_iter().zip(&names) {
        let file = dir.join(format!("{name}.1"));
        std::fs::write(&file, render(cmd, &path, &names)?)?;
        written.push(file);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_a_subcommand_with_every_section() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_all(&crate::cli::command(), dir.path()).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for want in
            ["imgforge.1", "imgforge-customize.1", "imgforge-ganeti-install-os.1", "imgforge-helper-image-build.1"]
        {
            assert!(names.contains(&want.to_owned()), "{want} in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("generate") || n.starts_with("imgforge-help.")), "{names:?}");
        let customize = std::fs::read_to_string(dir.path().join("imgforge-customize.1")).unwrap();
        for section in
            ["SYNOPSIS", "OPTIONS", "EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES", "SECURITY", "SEE ALSO"]
        {
            assert!(
                customize.contains(&format!(".SH \"{section}\"")) || customize.contains(&format!(".SH {section}")),
                "{section}"
            );
        }
        assert!(customize.contains("\\-\\-hostname"), "the options are clap's");
        assert!(customize.contains("[alias: \\-\\-memsize]"), "aliases as --help shows them");
        assert!(customize.contains("[alias: \\-\\-colours]"), "global options too");
        assert!(customize.contains("\\-\\-root\\-password password:s3cret"), "the README's example");
        let write = std::fs::read_to_string(dir.path().join("imgforge-write.1")).unwrap();
        assert!(!write.contains("s3cret"), "examples are the page's own");
    }
}
