//! Builds the static helper binary (a nested cargo run, so one `cargo build` yields a
//! self-contained `imgforge`) and embeds the task scripts and helper-image recipe.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const HELPER_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    println!("cargo:rerun-if-changed={}", manifest_dir.join("src/helper_image").display());
    for dir in ["helper", "protocol", "tasks", "helper-image"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=IMGFORGE_HELPER_BIN");

    let helper = match std::env::var_os("IMGFORGE_HELPER_BIN") {
        Some(path) => PathBuf::from(path),
        None => build_helper(&workspace),
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let helper_bytes =
        std::fs::read(&helper).unwrap_or_else(|e| panic!("cannot read the helper binary {}: {e}", helper.display()));
    std::fs::write(out.join("imgforge-helper"), &helper_bytes).unwrap();

    let mut digest = Sha256::new();
    digest.update(&helper_bytes);
    let tasks = embed_tasks(&workspace.join("tasks"), &out, &mut digest);
    // The assembly code and recipe decide the image's contents too: a change to either must
    // make cached images stale.
    for dir in [manifest_dir.join("src/helper_image"), workspace.join("helper-image")] {
        digest_dir(&dir, &mut digest);
    }
    println!("cargo:rustc-env=IMGFORGE_HELPER_DIGEST={}", hex::encode(digest.finalize()));
    // The code that chooses and downloads the kernel package keys the package cache: a change
    // to it must not go on using a package an older choice downloaded.
    let kernel_code = manifest_dir.join("src/helper_image/kernel.rs");
    let kernel_digest = Sha256::digest(std::fs::read(&kernel_code).unwrap());
    println!("cargo:rustc-env=IMGFORGE_KERNEL_CODE_DIGEST={}", hex::encode(&kernel_digest[..8]));
    println!("cargo:rerun-if-changed={}", tasks.display());
    println!("cargo:rustc-env=IMGFORGE_GIT_COMMIT={}", git_commit(&workspace));
}

/// The commit the workspace is at, for `--version`: `$IMGFORGE_GIT_COMMIT` when set (a build
/// from a source tarball may say where it came from), else git's answer, else `unknown` (no
/// git, or not a checkout). Re-run when HEAD moves, so a commit does not keep the old name.
fn git_commit(workspace: &Path) -> String {
    println!("cargo:rerun-if-env-changed=IMGFORGE_GIT_COMMIT");
    if let Ok(commit) = std::env::var("IMGFORGE_GIT_COMMIT") {
        return commit;
    }
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").arg("-C").arg(workspace).args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else { return "unknown".into() };
    // HEAD names a branch whose ref file (or packed-refs) moves on each commit; in a worktree
    // HEAD lives in its own git directory and the refs in the common one.
    for (dir_arg, files) in [("--git-dir", &["HEAD"][..]), ("--git-common-dir", &["packed-refs"][..])] {
        if let Some(dir) = git(&["rev-parse", "--path-format=absolute", dir_arg]) {
            for file in files {
                rerun_if_exists(&Path::new(&dir).join(file));
            }
        }
    }
    if let (Some(common), Some(branch)) =
        (git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]), git(&["symbolic-ref", "-q", "HEAD"]))
    {
        rerun_if_exists(&Path::new(&common).join(branch));
    }
    commit
}

/// A missing file would make cargo run the build script on every build.
fn rerun_if_exists(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// Builds `imgforge-helper` statically in its own target directory (no musl target here, so
/// glibc's static libc: `+crt-static`), under `$CARGO_TARGET_DIR` when the build has one.
fn build_helper(workspace: &Path) -> PathBuf {
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let target_root =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
    let target_dir = target_root.join("helper");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    let rustflags = format!(
        "-C target-feature=+crt-static --remap-path-prefix={}=/imgforge --remap-path-prefix={cargo_home}=/cargo",
        workspace.display()
    );
    let mut cmd = Command::new(cargo);
    // A clean environment: the outer cargo's variables (wrappers, flags, jobserver) must not
    // leak into the nested build.
    cmd.env_clear();
    for var in ["PATH", "HOME", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN", "CARGO_NET_OFFLINE"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd.env("RUSTFLAGS", rustflags)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("SOURCE_DATE_EPOCH", "0")
        .args(["build", "--release", "--locked", "-p", "imgforge-helper", "--target", HELPER_TARGET, "--target-dir"])
        .arg(&target_dir)
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"));
    let status = cmd.status().expect("cannot run cargo to build imgforge-helper");
    assert!(status.success(), "building the static imgforge-helper failed ({status})");
    target_dir.join(HELPER_TARGET).join("release").join("imgforge-helper")
}

fn digest_dir(dir: &Path, digest: &mut Sha256) {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            digest_dir(&path, digest);
        } else {
            digest.update(path.file_name().unwrap().as_encoded_bytes());
            digest.update(std::fs::read(&path).unwrap());
        }
    }
}

/// Copies the task scripts into OUT_DIR and writes `tasks.rs`, a table of (name, mode, bytes).
fn embed_tasks(dir: &Path, out: &Path, digest: &mut Sha256) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    let mut table = String::from(
        "/// The task scripts, embedded: (file name, mode, contents).\npub const TASKS: &[(&str, u32, &[u8])] = &[\n",
    );
    for entry in entries {
        let name = entry.file_name().into_string().unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        let bytes = std::fs::read(entry.path()).unwrap();
        digest.update(name.as_bytes());
        digest.update(mode.to_le_bytes());
        digest.update(&bytes);
        table.push_str(&format!(
            "    ({name:?}, 0o{mode:o}, include_bytes!({:?})),\n",
            entry.path().display().to_string()
        ));
    }
    table.push_str("];\n");
    let path = out.join("tasks.rs");
    std::fs::write(&path, table).unwrap();
    path
}
