//! `config_url`: a JSON object of OS parameters fetched at `create` (snf-image's), from
//! `http(s)://` or a `file:///` of this node. As in snf-image, its values replace those Ganeti
//! passed (`OSP_*`), which replace a variant's defaults; names are case-insensitive. Pure.

use super::params::{Members, ParamError, PARAMETERS};
use std::collections::BTreeMap;

/// The most of a `config_url` document imgforge reads.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// snf-image's OS parameters that `config_url` may set, beside imgforge's own
/// ([`PARAMETERS`]); those imgforge does not use are passed on and ignored as Ganeti's are.
const SNF_IMAGE_PARAMETERS: &[&str] = &[
    "img_id",
    "img_format",
    "img_passwd",
    "img_passwd_hash",
    "img_properties",
    "img_personality",
    "os_product_key",
    "os_answer_file",
    "auth_keys",
    "cloud_userdata",
    "inst_properties",
];

/// Parameters whose value is JSON text: the document may give them as JSON (an object or a
/// list) instead of a string holding it.
const JSON_VALUED: &[&str] = &["img_properties", "inst_properties", "img_personality"];

fn err(reason: String) -> ParamError {
    ParamError { param: "config_url".into(), reason }
}

/// The parameter `config_url` names, if any (`OSP_CONFIG_URL`, trimmed).
pub fn url(env: &BTreeMap<String, String>) -> Option<String> {
    env.get("OSP_CONFIG_URL").map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// Applies the fetched document `data` to Ganeti's environment `env`: each parameter it names
/// replaces `OSP_<NAME>`. Returns the warnings for the OS log (names it does not know, and a
/// `config_url` inside it, which is not followed).
pub fn apply(env: &mut BTreeMap<String, String>, data: &[u8]) -> Result<Vec<String>, ParamError> {
    if data.len() as u64 > MAX_CONFIG_BYTES {
        return Err(err(format!("the document is larger than {MAX_CONFIG_BYTES} bytes")));
    }
    let text = std::str::from_utf8(data).map_err(|_| err("the document is not UTF-8 text".into()))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| err(format!("the document is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(err("the document must be a JSON object of OS parameters".into()));
    }
    let Members(members) = serde_json::from_str(text).map_err(|e| err(format!("the document is not JSON: {e}")))?;
    let shown = |k: &str| format!("{:?}", imgforge_protocol::printable::printable(k));
    let mut set: BTreeMap<String, String> = BTreeMap::new();
    let mut warnings = Vec::new();
    for (key, value) in members {
        let name = key.to_ascii_lowercase();
        if name == "config_url" {
            warnings.push("config_url: the document's own config_url is not followed".to_owned());
            continue;
        }
        if !SNF_IMAGE_PARAMETERS.contains(&name.as_str()) && !PARAMETERS.iter().any(|(p, _)| *p == name) {
            warnings.push(format!("config_url: unknown parameter {} ignored", shown(&key)));
            continue;
        }
        let text = match value {
            serde_json::Value::String(s) => s,
            v @ (serde_json::Value::Object(_) | serde_json::Value::Array(_))
                if JSON_VALUED.contains(&name.as_str()) =>
            {
                v.to_string()
            }
            _ => return Err(err(format!("{name} must be a string (as Ganeti passes it)"))),
        };
        if let Some(earlier) = set.insert(name.clone(), text.clone()) {
            if earlier != text {
                return Err(err(format!(
                    "{name} is given twice with different values (names are case-insensitive): give it once"
                )));
            }
        }
    }
    for (name, value) in set {
        env.insert(format!("OSP_{}", name.to_ascii_uppercase()), value);
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_document_wins_over_ganetis_parameters() {
        let mut e = env(&[("OSP_IMG_ID", "debian"), ("OSP_IMG_PASSWD", "ganeti"), ("OSP_CONFIG_URL", "file:///c")]);
        let w = apply(
            &mut e,
            br#"{"img_id": "centos", "IMG_PROPERTIES": {"USERS": "root"}, "Auth_Keys": "ssh-ed25519 AAAA k", "img_personality": []}"#,
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(e["OSP_IMG_ID"], "centos", "config_url's value replaces Ganeti's, as snf-image");
        assert_eq!(e["OSP_IMG_PASSWD"], "ganeti", "what the document does not name stays");
        assert_eq!(e["OSP_IMG_PROPERTIES"], r#"{"USERS":"root"}"#);
        assert_eq!(e["OSP_AUTH_KEYS"], "ssh-ed25519 AAAA k");
        assert_eq!(e["OSP_IMG_PERSONALITY"], "[]");
        assert_eq!(e["OSP_CONFIG_URL"], "file:///c");
    }

    #[test]
    fn warnings_and_refusals() {
        let mut e = env(&[]);
        let w =
            apply(&mut e, br#"{"config_url": "http://elsewhere/", "frobnicate": "1", "A\nB": "x", "install": "vim"}"#)
                .unwrap();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("not followed"), "{w:?}");
        assert!(w.iter().any(|l| l.contains("unknown parameter \"frobnicate\"")), "{w:?}");
        assert!(w.iter().all(|l| !l.contains('\n')), "{w:?}");
        assert!(!e.contains_key("OSP_CONFIG_URL") && e["OSP_INSTALL"] == "vim", "{e:?}");
        let bad: &[(&[u8], &str)] = &[
            (b"[]", "must be a JSON object"),
            (b"{not json", "not JSON"),
            (b"", "not JSON"),
            (b"\xff{}", "not UTF-8"),
            (br#"{"img_id": 5}"#, "img_id must be a string"),
            (br#"{"img_id": null}"#, "img_id must be a string"),
            (br#"{"img_passwd": {"a": 1}}"#, "img_passwd must be a string"),
            (br#"{"img_id": "a", "IMG_ID": "b"}"#, "img_id is given twice"),
        ];
        for (doc, want) in bad {
            let e = apply(&mut env(&[]), doc).unwrap_err();
            assert_eq!(e.param, "config_url");
            assert!(e.to_string().contains(want), "{}: {e}", String::from_utf8_lossy(doc));
        }
        assert!(apply(&mut env(&[]), br#"{"img_id": "a", "IMG_ID": "a"}"#).is_ok());
        let big = format!(r#"{{"img_id": "{}"}}"#, "a".repeat(MAX_CONFIG_BYTES as usize));
        assert!(apply(&mut env(&[]), big.as_bytes()).unwrap_err().to_string().contains("larger than"));
    }
}
