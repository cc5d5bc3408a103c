//! `imgforge build RECIPE`: a 2 × 2 matrix on a fixture, the outputs read back with the test's
//! own read-only mounts, one failing variant failing alone, provenance checked by
//! `verify --provenance`; and what a recipe refuses before any VM boots.

use imgforge_tests::fixtures::{self, sha256_hex, Shape};
use imgforge_tests::readback::{shadow_field, Mount};
use imgforge_tests::run::{code, imgforge, s};
use std::os::unix::fs::FileExt;
use std::path::Path;

mod progress_schema;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIImgforgeFixtureKeyForTestsOnly000000000000 recipe@imgforge";

/// A recipe over `base` (its digest `sha256`) with `body` before the [base] table.
fn recipe(dir: &Path, base: &Path, sha256: &str, body: &str) -> std::path::PathBuf {
    let path = dir.join("sites.toml");
    let text = format!("{body}\n[base]\nimage = \"{}\"\nsha256 = \"{sha256}\"\n", s(base));
    std::fs::write(&path, text).unwrap();
    path
}

const MATRIX: &str = r#"seed = "recipe-test-seed"
output = "{site}-{role}.img"
operations = [
  "hostname {site}-{role}",
  "write /etc/site:{site}",
  "root-password password:Recipe-Pw-1",
  "ssh-inject root:string:KEY",
]

[matrix]
site = ["ath", "ber"]
role = ["web", "db"]

[[variant]]
match = { site = "ath", role = "web" }
operations = ["write /etc/primary:{variant}"]

[[variant]]
match = { site = "ber", role = "db" }
operations = ["run-command echo ber-db fails on purpose; exit 3"]
"#;

#[test]
fn a_two_by_two_matrix_one_variant_failing_alone_with_provenance() {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::disk(Shape::DosExt4).unwrap();
    let base_before = sha256_hex(&base);
    let file = recipe(work.path(), &base, &base_before, &MATRIX.replace("KEY", KEY));
    let out_dir = work.path().join("out");
    let out = imgforge(&[
        "build",
        &s(&file),
        "--jobs",
        "2",
        "--out-dir",
        &s(&out_dir),
        "--accel",
        "tcg",
        "--progress",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 1, "a failing run-command fails the build");
    assert!(stderr.contains("1 of 4 variants failed") && stderr.contains("ber-db"), "{stderr}");
    assert_eq!(sha256_hex(&base), base_before, "the base changed");

    // Progress: every variant started, three done, ber-db failed, all lines in the schema.
    let events = progress_schema::events(&String::from_utf8_lossy(&out.stdout));
    let of = |kind: &str| -> Vec<String> {
        let mut names: Vec<String> =
            events.iter().filter(|e| e["type"] == kind).map(|e| e["name"].as_str().unwrap().to_owned()).collect();
        names.sort();
        names
    };
    assert_eq!(of("variant-started"), ["ath-db", "ath-web", "ber-db", "ber-web"]);
    assert_eq!(of("variant-done"), ["ath-db", "ath-web", "ber-web"]);
    assert_eq!(of("variant-failed"), ["ber-db"]);
    assert!(events.iter().all(|e| e["type"] != "variant-started" || e["total"] == 4));

    assert!(!out_dir.join("ber-db.img").exists() && !out_dir.join("ber-db.img.provenance.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let mut root_fields = Vec::new();
    for (site, role) in [("ath", "web"), ("ath", "db"), ("ber", "web")] {
        let name = format!("{site}-{role}");
        let img = out_dir.join(format!("{name}.img"));
        {
            let m = Mount::partition(&img, 0).unwrap();
            assert_eq!(m.read("/etc/hostname").unwrap().trim(), name);
            assert_eq!(m.read("/etc/site").unwrap(), site);
            assert_eq!(m.join("/etc/primary").exists(), name == "ath-web", "{name}: the per-variant file");
            if name == "ath-web" {
                assert_eq!(m.read("/etc/primary").unwrap(), "ath-web");
            }
            assert!(m.read("/root/.ssh/authorized_keys").unwrap().contains(KEY), "{name}: the key");
            let field = shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap();
            imgforge_tests::readback::check_sha512_crypt("Recipe-Pw-1", &field).unwrap();
            root_fields.push(field);
        }
        // The provenance names the image, the base, the recipe, the redacted operations.
        let statement_path = out_dir.join(format!("{name}.img.provenance.json"));
        let text = std::fs::read_to_string(&statement_path).unwrap();
        assert!(!text.contains("Recipe-Pw-1"), "{name}: the password is in the provenance");
        let st: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(st["_type"], "https://in-toto.io/Statement/v1");
        assert_eq!(st["predicateType"], "https://slsa.dev/provenance/v1");
        assert_eq!(st["subject"][0]["name"], format!("{name}.img"));
        assert_eq!(st["subject"][0]["digest"]["sha256"], sha256_hex(&img));
        let def = &st["predicate"]["buildDefinition"];
        assert_eq!(def["resolvedDependencies"][0]["digest"]["sha256"], base_before);
        let helper = def["resolvedDependencies"][1]["digest"]["sha256"].as_str().unwrap();
        assert!(helper.len() == 64 && helper.bytes().all(|b| b.is_ascii_hexdigit()), "helper image sha256 {helper}");
        assert_eq!(def["externalParameters"]["recipe"]["digest"]["sha256"], sha256_hex(&file));
        assert_eq!(def["externalParameters"]["matrix"]["site"], site);
        let ops = def["internalParameters"]["operations"].as_array().unwrap();
        assert_eq!(ops[0], format!("hostname {name}"));
        assert_eq!(ops[2], "root-password password:<redacted>");
        assert_eq!(tree_manifest_digest(&out_dir, &format!("{name}.img")).len(), 64, "{name}: no tree manifest");
        let changes = st["predicate"]["runDetails"]["byproducts"].to_string();
        assert!(changes.contains("/etc/site"), "{name}: the change list misses /etc/site: {changes}");
        assert!(st["predicate"]["runDetails"]["builder"]["version"]["imgforge"]
            .as_str()
            .unwrap()
            .contains("helper image recipe"));
    }
    // The seed gives each variant its own salt.
    root_fields.sort();
    root_fields.dedup();
    assert_eq!(root_fields.len(), 3, "three variants, three salts");

    // verify --provenance: the image as built passes; one byte changed fails.
    let img = out_dir.join("ath-web.img");
    let statement = s(&out_dir.join("ath-web.img.provenance.json"));
    let ok = imgforge(&["verify", "--provenance", &statement, &s(&img)]);
    assert_eq!(code(&ok), 0);
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK"));
    let other = imgforge(&["verify", "--provenance", &statement, &s(&out_dir.join("ath-db.img"))]);
    assert_eq!(code(&other), 1, "another variant's image");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut byte = [0u8; 1];
    f.read_at(&mut byte, 4096).unwrap();
    f.write_all_at(&[byte[0] ^ 1], 4096).unwrap();
    drop(f);
    let changed = imgforge(&["verify", "--provenance", &statement, &s(&img)]);
    assert_eq!(code(&changed), 1);
    let msg = String::from_utf8_lossy(&changed.stderr);
    assert!(msg.contains("FAIL") && msg.contains("not the one built"), "{msg}");
}

/// What the recipe gets wrong is refused with its line, before any helper VM boots (each of
/// these would take a minute under TCG if one did); a base of another digest than the recipe's
/// (hashed while the helper VMs boot) stops them at once, and nothing is built.
#[test]
fn bad_recipes_are_refused_before_any_boot() {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::disk(Shape::DosExt4).unwrap();
    let sha = sha256_hex(&base);
    let wrong = "0".repeat(64);
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            &sha,
            "operations = [\n  \"hostname ok\",\n  \"mkdir relative/path\",\n]\n",
            &["sites.toml:3:", "must be absolute"],
        ),
        (
            &sha,
            "[matrix]\nsite = [\"a\"]\n[[variant]]\nmatch = { site = \"b\" }\n",
            &["sites.toml:4:", "matches no variant"],
        ),
        (&sha, "operations = [\"hostname {site}\"]\n", &["sites.toml:1:", "{site} is not a variable"]),
        (&wrong, "operations = [\"hostname a\"]\n", &["has sha256", &sha, "nothing was built"]),
    ];
    for (digest, body, wants) in cases {
        let file = recipe(work.path(), &base, digest, body);
        let out_dir = work.path().join("out");
        let started = std::time::Instant::now();
        let out = imgforge(&["build", &s(&file), "--out-dir", &s(&out_dir), "--accel", "tcg"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 2, "{body}: {stderr}");
        for want in wants {
            assert!(stderr.contains(want), "{body}: {want:?} not in {stderr}");
        }
        assert!(started.elapsed().as_secs() < 20, "{body}: a helper VM booted");
        let made: Vec<_> = std::fs::read_dir(&out_dir).map(|d| d.count()).into_iter().collect();
        assert!(made.iter().all(|n| *n == 0), "{body}: outputs made");
    }
}

/// A base that is not a regular file (a FIFO no one writes, an endless device) is refused at
/// once, naming it: it cannot be what a digest was taken of, and hashing it would never end.
#[test]
fn a_base_that_is_not_a_regular_file_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("base.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let sha = "0".repeat(64);
    for base in [fifo.clone(), Path::new("/dev/zero").to_owned()] {
        let file = recipe(work.path(), &base, &sha, "operations = [\"hostname a\"]\n");
        let out_dir = work.path().join("out");
        let mut child = std::process::Command::new(imgforge_tests::run::binary())
            .args(["build", &s(&file), "--out-dir", &s(&out_dir), "--accel", "tcg"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && started.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("imgforge build over {} still runs after 20 s", base.display());
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 2, "{}: {stderr}", base.display());
        assert!(stderr.contains(&s(&base)) && stderr.contains("not a regular file"), "{stderr}");
    }
}

/// `verify --provenance` of an image that takes long to read (here an endless device) stops on
/// SIGINT and SIGTERM with the interrupted status instead of reading on.
#[test]
fn verify_provenance_stops_on_a_signal() {
    let work = tempfile::tempdir().unwrap();
    let statement = work.path().join("p.json");
    let digest = "0".repeat(64);
    let text = format!(
        r#"{{"_type":"https://in-toto.io/Statement/v1","predicateType":"https://slsa.dev/provenance/v1",
"subject":[{{"name":"a.img","digest":{{"sha256":"{digest}"}}}}],
"predicate":{{"buildDefinition":{{"buildType":"x"}},"runDetails":{{"builder":{{"id":"y"}}}}}}}}"#
    );
    std::fs::write(&statement, text).unwrap();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut child = std::process::Command::new(imgforge_tests::run::binary())
            .args(["verify", "--provenance", &s(&statement), "/dev/zero"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(child.try_wait().unwrap().is_none(), "verify of /dev/zero ended by itself");
        // SAFETY: the child's pid, still running (not reaped).
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let sent = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && sent.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("verify --provenance still runs 10 s after signal {signal}");
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 130, "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// An output or statement name taken by a dangling symlink is refused before anything runs,
/// like an existing output (the final rename would fail only after every helper VM ran).
#[test]
fn a_dangling_symlink_in_the_way_is_refused_first() {
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base.img");
    std::fs::write(&base, b"not checked: the digest is wrong").unwrap();
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    for taken in ["default.img", "default.img.provenance.json"] {
        let link = out_dir.join(taken);
        std::os::unix::fs::symlink(work.path().join("nowhere"), &link).unwrap();
        let file = recipe(work.path(), &base, &"0".repeat(64), "operations = [\"hostname a\"]\n");
        let out = imgforge(&["build", &s(&file), "--out-dir", &s(&out_dir), "--accel", "tcg"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), 2, "{stderr}");
        assert!(stderr.contains("exists") && stderr.contains("never overwrites"), "{taken}: {stderr}");
        std::fs::remove_file(&link).unwrap();
    }
}

/// An output named like the file a URL base is downloaded to is refused before the download
/// (it would meet the base there, and fail only after every helper VM ran).
#[test]
fn an_output_named_like_the_downloaded_base_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let sha = "0123456789abcdef".repeat(4);
    let path = work.path().join("sites.toml");
    // Port 9 (discard): nothing answers; the recipe must be refused before anything is asked.
    let text = format!(
        "output = \"base-0123456789abcdef.img\"\noperations = [\"hostname a\"]\n[base]\nimage = \"http://127.0.0.1:9/base.img\"\nsha256 = \"{sha}\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let out_dir = work.path().join("out");
    let out = imgforge(&["build", &s(&path), "--out-dir", &s(&out_dir), "--accel", "tcg"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 2, "{stderr}");
    assert!(stderr.contains("sites.toml:1:") && stderr.contains("where the downloaded base goes"), "{stderr}");
}

/// A recipe is read with a bound: `/dev/zero` (or a runaway generator on a pipe) is refused,
/// not read until memory runs out; a recipe on a pipe (`<(...)`) is read as any other.
#[test]
fn a_recipe_is_read_with_a_bound() {
    let mut child = std::process::Command::new(imgforge_tests::run::binary())
        .args(["build", "/dev/zero", "--accel", "tcg"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed().as_secs() < 15 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap();
        let _ = child.wait();
        panic!("imgforge build /dev/zero still reads after 15 s");
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 2, "{stderr}");
    assert!(stderr.contains("/dev/zero") && stderr.contains("too large"), "{stderr}");
}

/// The same seed gives the same salt and random password, build after build; `--seed` with
/// another value gives others.
#[test]
fn the_same_seed_gives_the_same_shadow_fields() {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::disk(Shape::DosExt4).unwrap();
    let file = recipe(
        work.path(),
        &base,
        &sha256_hex(&base),
        "seed = \"same-seed\"\nname = \"one\"\noperations = [\"root-password random\", \"password root:locked:password:Pw-2\"]\n",
    );
    let build = |dir: &str, seed: Option<&str>| {
        let out_dir = work.path().join(dir);
        let mut args =
            vec!["build".to_owned(), s(&file), "--out-dir".into(), s(&out_dir), "--accel".into(), "tcg".into()];
        if let Some(seed) = seed {
            args.extend(["--seed".to_owned(), seed.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = imgforge(&args);
        assert_eq!(code(&out), 0);
        let told =
            String::from_utf8_lossy(&out.stdout).lines().find(|l| l.contains("random password")).unwrap().to_owned();
        let m = Mount::partition(&out_dir.join("one.img"), 0).unwrap();
        (
            told,
            shadow_field(&m.read("/etc/shadow").unwrap(), "root").unwrap(),
            tree_manifest_digest(&out_dir, "one.img"),
        )
    };
    let first = build("a", None);
    let second = build("b", None);
    assert_eq!(first, second, "the same seed, the same random password, salts and tree manifest");
    assert!(first.1.starts_with("!$6$"), "{}", first.1);
    assert_eq!(first.2.len(), 64, "the helper's manifest digest: {}", first.2);
    let other = build("c", Some("another-seed"));
    assert_ne!(first.0, other.0);
    assert_ne!(first.1, other.1);
    assert_ne!(first.2, other.2, "another seed, another /etc/shadow, another manifest");
}

/// The tree manifest's digest the provenance of `output` in `dir` records.
fn tree_manifest_digest(dir: &std::path::Path, output: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{output}.provenance.json"))).unwrap();
    let st: serde_json::Value = serde_json::from_str(&text).unwrap();
    st["predicate"]["runDetails"]["byproducts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "tree-manifest")
        .and_then(|b| b["digest"]["sha256"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// A base given as a URL (zstd-compressed raw here) is downloaded once, checked against the
/// recipe's SHA-256, and not kept once the (raw) variants are made; a wrong digest makes
/// nothing.
#[test]
fn a_base_from_a_url_is_downloaded_and_checked() {
    let work = tempfile::tempdir().unwrap();
    let base = fixtures::disk(Shape::DosExt4).unwrap();
    let zst = work.path().join("base.img.zst");
    fixtures::sh(std::process::Command::new("zstd").args(["-q", "-1", "-T2", "-o"]).arg(&zst).arg(&base)).unwrap();
    let sha = sha256_hex(&zst);
    let (url, _) = imgforge_tests::http::serve_files(vec![("/base.img.zst".into(), std::fs::read(&zst).unwrap())]);
    let write = |digest: &str, dir: &str| {
        let path = work.path().join(format!("{dir}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"one\"\noperations = [\"write /etc/from-url:yes\"]\n[base]\nimage = \"{url}/base.img.zst\"\nsha256 = \"{digest}\"\n"
            ),
        )
        .unwrap();
        let out_dir = work.path().join(dir);
        let out = imgforge(&["build", &s(&path), "--out-dir", &s(&out_dir), "--accel", "tcg"]);
        (out, out_dir)
    };
    let (bad, bad_dir) = write(&"0".repeat(64), "bad");
    assert_eq!(code(&bad), 2, "a wrong digest is bad input");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sha256"));
    assert_eq!(std::fs::read_dir(&bad_dir).unwrap().count(), 0, "something was kept");

    let (good, out_dir) = write(&sha, "good");
    assert_eq!(code(&good), 0);
    let m = Mount::partition(&out_dir.join("one.img"), 0).unwrap();
    assert_eq!(m.read("/etc/from-url").unwrap(), "yes");
    let mut names: Vec<String> =
        std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["one.img", "one.img.provenance.json"], "the downloaded base is not kept");
}
