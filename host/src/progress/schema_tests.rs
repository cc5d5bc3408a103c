//! The stream against its published schema (`docs/progress-v1.schema.json`) and against the
//! bytes snf-image monitors saw before the stream was typed.

use super::*;
use imgforge_protocol::change::{escape_path, Aspect, ChangeKind, FileChange, FileState, FileType};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

const SCHEMA: &str = include_str!("../../../docs/progress-v1.schema.json");

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
    jsonschema::draft202012::new(&schema).expect("the schema is a valid draft 2020-12 schema")
}

/// Checks `line` against the schema and returns it parsed.
fn check(validator: &jsonschema::Validator, line: &str) -> Value {
    let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{line}\ndoes not match docs/progress-v1.schema.json: {errors:#?}");
    value
}

/// `type`, or `type/subtype` for `image-helper`.
fn kind(value: &Value) -> String {
    match value.get("subtype").and_then(Value::as_str) {
        Some(subtype) => format!("{}/{subtype}", value["type"].as_str().unwrap_or("?")),
        None => value["type"].as_str().unwrap_or("?").to_owned(),
    }
}

/// The kinds the schema describes, read from its `type` and `subtype` constants.
fn kinds_in_schema() -> BTreeSet<String> {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let mut kinds = BTreeSet::new();
    for def in schema["$defs"].as_object().unwrap().values() {
        let Some(ty) = def.pointer("/properties/type/const").and_then(Value::as_str) else { continue };
        let subtypes: Vec<&str> = match def.pointer("/properties/subtype") {
            Some(s) if s.get("const").is_some() => vec![s["const"].as_str().unwrap()],
            Some(s) => s["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect(),
            None => {
                kinds.insert(ty.to_owned());
                continue;
            }
        };
        kinds.extend(subtypes.iter().map(|s| format!("{ty}/{s}")));
    }
    kinds
}

/// One event of every kind, with the optional fields both present and absent. A new variant
/// breaks the match below: give it a sample here and a definition in the schema.
fn samples() -> Vec<Event> {
    let every_variant = |event: &Event| match event {
        Event::ImageInfo(_)
        | Event::ImageCopyProgress { .. }
        | Event::ImageError { .. }
        | Event::ImageDone
        | Event::RandomPassword { .. }
        | Event::FileChange(_)
        | Event::FileChangesOmitted { .. }
        | Event::VariantStarted { .. }
        | Event::VariantDone { .. }
        | Event::VariantFailed { .. } => (),
        Event::ImageHelper(helper) => match helper {
            HelperEvent::TaskStart { .. }
            | HelperEvent::TaskEnd { .. }
            | HelperEvent::Warning { .. }
            | HelperEvent::Error { .. }
            | HelperEvent::Phase { .. } => (),
        },
    };
    let task = || "50-Customize".to_owned();
    let samples = vec![
        ImageInfo::source("/srv/images/debian.raw", "raw", Some(2 << 30), Path::new("/dev/vg/disk0")).into(),
        ImageInfo::source("/srv/images/debian.raw.xz", "xz", None, Path::new("/var/lib/disk.img")).into(),
        ImageInfo::source("/srv/live.iso", "liveimg", Some(1 << 30), Path::new("/tmp/root.img"))
            .with_rootfs("LiveOS/rootfs.img")
            .into(),
        ImageInfo::source("http://images.example/d.raw.gz", "gzip", None, Path::new("d.img"))
            .with_download_size(None)
            .into(),
        ImageInfo::source("http://images.example/d.raw", "raw", Some(4096), Path::new("d.img"))
            .with_download_size(Some(4096))
            .into(),
        ImageInfo::disk(Path::new("/var/lib/disk.qcow2"), "qcow2", 1 << 20).into(),
        Event::copy_progress(1 << 20, Some(3 << 20)),
        Event::copy_progress(1 << 20, None),
        HelperEvent::TaskStart { task: task() }.into(),
        HelperEvent::TaskEnd { task: task() }.into(),
        HelperEvent::Warning { task: task(), messages: vec!["no swap partition".into()] }.into(),
        HelperEvent::Error { task: task(), messages: vec!["--run-command 'false' failed".into()] }.into(),
        HelperEvent::Phase { phase: "helper rules read".into(), host_ms: 812, guest_ms: Some(530) }.into(),
        HelperEvent::Phase { phase: "qemu exited".into(), host_ms: 4100, guest_ms: None }.into(),
        Event::error("task 50-Customize failed in the helper VM: --run-command 'false' failed"),
        Event::ImageDone,
        Event::RandomPassword { user: "root".into(), variant: None, password: Secret::new("s3cret-Rand0m".into()) },
        Event::RandomPassword {
            user: "root".into(),
            variant: Some("ath-web".into()),
            password: Secret::new("s3cret-Rand0m".into()),
        },
        Event::FileChange(file_change(ChangeKind::Added, "/etc/x", vec![], None)),
        Event::FileChange(file_change(ChangeKind::Removed, "/etc/motd", vec![], None)),
        Event::FileChange(file_change(
            ChangeKind::Changed,
            "/etc/hostname",
            vec![Aspect::Mode, Aspect::Owner, Aspect::Content],
            Some(FileState { file_type: FileType::File, mode: 0o644, uid: 1000, gid: 1000 }),
        )),
        Event::FileChange(file_change(ChangeKind::Added, &escape_path(b"/x\nSUCCESS\xff"), vec![], None)),
        Event::FileChangesOmitted { count: 120 },
        Event::VariantStarted { name: "ath-web".into(), index: 0, total: 4 },
        Event::VariantDone { name: "ath-web".into(), index: 0, total: 4, output: "out/ath-web.img".into() },
        Event::VariantFailed {
            name: "ath-db".into(),
            index: 1,
            total: 4,
            messages: vec!["task 50-Customize failed in the helper VM: --run-command 'false' failed".into()],
        },
    ];
    samples.iter().for_each(every_variant);
    samples
}

/// A dry run's change of `path`, a 0600 root-owned file after the run.
fn file_change(change: ChangeKind, path: &str, what: Vec<Aspect>, was: Option<FileState>) -> FileChange {
    let state = FileState { file_type: FileType::File, mode: 0o600, uid: 0, gid: 0 };
    FileChange { change, path: path.to_owned(), state, what, was }
}

#[test]
fn every_kind_of_event_matches_the_schema() {
    let validator = validator();
    let mut seen = BTreeSet::new();
    for event in samples() {
        let line = Line::now(event);
        let text = to_json_line(&line).unwrap();
        assert!(!text.contains('\n'), "{text}");
        let value = check(&validator, &text);
        assert_eq!(value["v"], VERSION);
        seen.insert(kind(&value));
        let back: Line = serde_json::from_str(&text).expect("a line reads back");
        assert_eq!(back, Line { event: without_secret(line.event.clone()), ..line }, "{text}");
    }
    assert_eq!(seen, kinds_in_schema(), "the samples and the schema describe different kinds of events");
}

/// What a reader of the stream gets back: everything but the secret.
fn without_secret(event: Event) -> Event {
    match event {
        Event::RandomPassword { user, variant, .. } => {
            Event::RandomPassword { user, variant, password: Secret::default() }
        }
        other => other,
    }
}

#[test]
fn schema_rejects_what_is_not_an_event() {
    let validator = validator();
    for bad in [
        r#"{"type":"image-done","timestamp":1.5}"#,
        r#"{"type":"image-done","timestamp":1.5,"v":2}"#,
        r#"{"type":"image-teleport","timestamp":1.5,"v":1}"#,
        r#"{"type":"image-helper","subtype":"task-start","timestamp":1.5,"v":1}"#,
        r#"{"type":"image-copy-progress","position":1,"total":2,"progress":101.0,"timestamp":1.5,"v":1}"#,
        r#"{"type":"random-password","user":"root","password":"x","timestamp":1.5,"v":1}"#,
        r#"{"type":"file-change","change":"added","path":"/x","file_type":"file","mode":"644","uid":0,"gid":0,"timestamp":1.5,"v":1}"#,
        r#"{"type":"file-change","change":"moved","path":"/x","file_type":"file","mode":"0644","uid":0,"gid":0,"timestamp":1.5,"v":1}"#,
        r#"{"type":"file-change","change":"added","file_type":"file","mode":"0644","uid":0,"gid":0,"timestamp":1.5,"v":1}"#,
        r#"{"type":"file-change","change":"changed","path":"/x","file_type":"file","mode":"0644","uid":0,"gid":0,"what":["colour"],"timestamp":1.5,"v":1}"#,
        r#"{"type":"file-changes-omitted","count":-1,"timestamp":1.5,"v":1}"#,
    ] {
        assert!(!validator.is_valid(&serde_json::from_str(bad).unwrap()), "accepted: {bad}");
    }
}

/// The lines snf-image monitors read are what the untyped emitter wrote (keys sorted, nulls
/// kept, `messages` as a list), with `"v"` added.
#[test]
fn snf_image_types_keep_their_bytes() {
    let at = |event: Event| to_json_line(&Line { v: VERSION, timestamp: 1700000000.25, event }).unwrap();
    let cases: Vec<(Event, &str)> = vec![
        (
            ImageInfo::source("/i/d.raw", "raw", Some(67108864), Path::new("/t/o.img")).into(),
            r#"{"format":"raw","size":67108864,"source":"/i/d.raw","target":"/t/o.img","timestamp":1700000000.25,"type":"image-info","v":1}"#,
        ),
        (
            ImageInfo::source("/i/d.xz", "xz", None, Path::new("o.img")).into(),
            r#"{"format":"xz","size":null,"source":"/i/d.xz","target":"o.img","timestamp":1700000000.25,"type":"image-info","v":1}"#,
        ),
        (
            ImageInfo::source("/i/l.iso", "liveimg", Some(10), Path::new("r.img"))
                .with_rootfs("LiveOS/rootfs.img")
                .into(),
            r#"{"format":"liveimg","rootfs":"LiveOS/rootfs.img","size":10,"source":"/i/l.iso","target":"r.img","timestamp":1700000000.25,"type":"image-info","v":1}"#,
        ),
        (
            ImageInfo::source("http://h/d.gz", "gzip", None, Path::new("o")).with_download_size(None).into(),
            r#"{"download_size":null,"format":"gzip","size":null,"source":"http://h/d.gz","target":"o","timestamp":1700000000.25,"type":"image-info","v":1}"#,
        ),
        (
            ImageInfo::disk(Path::new("/d.qcow2"), "qcow2", 196624).into(),
            r#"{"format":"qcow2","path":"/d.qcow2","size":196624,"timestamp":1700000000.25,"type":"image-info","v":1}"#,
        ),
        (
            Event::copy_progress(335547996, Some(474398720)),
            r#"{"position":335547996,"progress":70.73,"timestamp":1700000000.25,"total":474398720,"type":"image-copy-progress","v":1}"#,
        ),
        (
            Event::copy_progress(64 << 20, Some(64 << 20)),
            r#"{"position":67108864,"progress":100.0,"timestamp":1700000000.25,"total":67108864,"type":"image-copy-progress","v":1}"#,
        ),
        (
            Event::copy_progress(5, None),
            r#"{"position":5,"progress":null,"timestamp":1700000000.25,"total":null,"type":"image-copy-progress","v":1}"#,
        ),
        (
            HelperEvent::TaskStart { task: "10-FindRoot".into() }.into(),
            r#"{"subtype":"task-start","task":"10-FindRoot","timestamp":1700000000.25,"type":"image-helper","v":1}"#,
        ),
        (
            HelperEvent::TaskEnd { task: "10-FindRoot".into() }.into(),
            r#"{"subtype":"task-end","task":"10-FindRoot","timestamp":1700000000.25,"type":"image-helper","v":1}"#,
        ),
        (
            HelperEvent::Warning { task: "20-Grow".into(), messages: vec!["w".into()] }.into(),
            r#"{"messages":["w"],"subtype":"warning","task":"20-Grow","timestamp":1700000000.25,"type":"image-helper","v":1}"#,
        ),
        (
            HelperEvent::Error { task: "20-Grow".into(), messages: vec!["e".into()] }.into(),
            r#"{"messages":["e"],"subtype":"error","task":"20-Grow","timestamp":1700000000.25,"type":"image-helper","v":1}"#,
        ),
        (
            HelperEvent::Phase { phase: "first console line".into(), host_ms: 310, guest_ms: None }.into(),
            r#"{"guest_ms":null,"host_ms":310,"phase":"first console line","subtype":"phase","timestamp":1700000000.25,"type":"image-helper","v":1}"#,
        ),
        (Event::error("bad"), r#"{"messages":["bad"],"timestamp":1700000000.25,"type":"image-error","v":1}"#),
        (Event::ImageDone, r#"{"timestamp":1700000000.25,"type":"image-done","v":1}"#),
    ];
    for (event, want) in cases {
        assert_eq!(at(event), want);
    }
}

#[test]
fn random_password_line_names_the_user_only() {
    let event =
        Event::RandomPassword { user: "alice".into(), variant: None, password: Secret::new("Xy7-secret".into()) };
    assert!(!format!("{event:?}").contains("Xy7-secret"), "Debug shows the password");
    let text = to_json_line(&Line { v: VERSION, timestamp: 2.5, event }).unwrap();
    assert_eq!(text, r#"{"timestamp":2.5,"type":"random-password","user":"alice","v":1}"#);
    let event = Event::RandomPassword {
        user: "root".into(),
        variant: Some("ath-web".into()),
        password: Secret::new("pw".into()),
    };
    let text = to_json_line(&Line { v: VERSION, timestamp: 2.5, event }).unwrap();
    assert_eq!(text, r#"{"timestamp":2.5,"type":"random-password","user":"root","v":1,"variant":"ath-web"}"#);
}

/// A writer the test can read after the emitter dropped its handle.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The real emitter over a real write (a raw and a gzip image onto new files) and the helper
/// events of a customization: every line it writes matches the schema.
#[test]
fn the_emitter_writes_lines_that_match_the_schema() {
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("image.raw");
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let gz = dir.path().join("image.raw.gz");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(&data).unwrap();
    std::fs::write(&gz, encoder.finish().unwrap()).unwrap();

    let out = Shared::default();
    let emitter = JsonLines::new(out.clone());
    let progress: &dyn Progress = &emitter;
    let password = "Rand-0m-Pw";
    progress.emit(Event::RandomPassword { user: "root".into(), variant: None, password: Secret::new(password.into()) });
    for (source, target) in [(&raw, "a.img"), (&gz, "b.img")] {
        let request = crate::job::write::WriteRequest {
            http: Default::default(),
            reach: crate::source::reach::Reach::Any,
            confinement: Default::default(),
            image: crate::source::Location::Path(source.clone()),
            target: dir.path().join(target),
            force: false,
            size: None,
            sha256: None,
            sha256_before_write: false,
            backing_file: None,
        };
        crate::job::write::write(&request, progress, &AtomicBool::new(false)).expect("the image is written");
    }
    progress.emit(ImageInfo::disk(&dir.path().join("b.img"), "raw", 3 << 20).into());
    progress.emit(HelperEvent::Phase { phase: "qemu started (tcg)".into(), host_ms: 0, guest_ms: None }.into());
    progress.emit(HelperEvent::Phase { phase: "helper rules read".into(), host_ms: 2150, guest_ms: Some(1400) }.into());
    for task in ["10-FindRoot", "50-Customize"] {
        progress.emit(HelperEvent::TaskStart { task: task.into() }.into());
        progress.emit(HelperEvent::TaskEnd { task: task.into() }.into());
    }
    progress.emit(HelperEvent::Warning { task: "90-Unmount".into(), messages: vec!["lazy unmount".into()] }.into());
    progress.emit(HelperEvent::Phase { phase: "qemu exited".into(), host_ms: 9000, guest_ms: None }.into());
    progress.emit(Event::ImageDone);
    progress.emit(Event::error("a second job failed"));
    drop(emitter);

    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert!(!text.contains(password), "the password is in the stream");
    let validator = validator();
    let values: Vec<Value> = text.lines().map(|line| check(&validator, line)).collect();
    let kinds: Vec<String> = values.iter().map(kind).collect();
    for want in ["random-password", "image-info", "image-copy-progress", "image-helper/task-start", "image-done"] {
        assert!(kinds.iter().any(|k| k == want), "{want} missing: {kinds:?}");
    }
    let copies: Vec<&Value> = values.iter().filter(|v| v["type"] == "image-copy-progress").collect();
    assert_eq!(copies.last().unwrap()["position"], 3 << 20);
    assert_eq!(copies.last().unwrap()["progress"], 100.0);
    assert_eq!(values.iter().filter(|v| v["type"] == "image-info").count(), 3);
}
