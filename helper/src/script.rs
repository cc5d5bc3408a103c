//! What the task runner reads from a task script's text before starting it (pure): whether the
//! script only hands over to a task built into the helper (`exec imgforge-helper mount-root`),
//! which the runner then runs in its own process, and the `# only-if:` conditions under which
//! the script has anything to do. Under TCG every process costs tens of milliseconds; this
//! spares the runs that would only start a shell to exit or to exec the helper again.
//!
//! ```text
//! # only-if: IMGFORGE_MODE=verify                  run only when the variable has this value
//! # only-if: IMGFORGE_RPMS IMGFORGE_INSTALL        run only when one of them is not empty
//! ```
//!
//! Several `only-if` lines must all hold. The scripts keep their own checks, so that they behave
//! the same when run by hand.

/// A condition of a `# only-if:` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `VAR=value`: the variable has exactly this value.
    Equals(String, String),
    /// `VAR1 VAR2 …`: at least one of them is set and not empty.
    AnySet(Vec<String>),
}

impl Condition {
    /// Whether the condition holds, `lookup` giving a variable's value.
    pub fn holds<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> bool {
        match self {
            Condition::Equals(var, value) => lookup(var) == Some(value.as_str()),
            Condition::AnySet(vars) => vars.iter().any(|v| lookup(v).is_some_and(|x| !x.is_empty())),
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Condition::Equals(var, value) => write!(f, "{var}={value}"),
            Condition::AnySet(vars) => write!(f, "{}", vars.join(" or ")),
        }
    }
}

/// What the runner knows of a script from its text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script {
    /// The conditions of its `# only-if:` lines.
    pub only_if: Vec<Condition>,
    /// The helper subcommand the script consists of (`exec imgforge-helper NAME`), if that is
    /// all it does.
    pub builtin: Option<String>,
}

const ONLY_IF: &str = "# only-if:";

fn is_variable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Reads a script's text. A malformed `only-if` line is ignored (the script then runs and
/// applies its own checks); only a script whose single command is `exec imgforge-helper NAME`
/// counts as built in.
pub fn parse(text: &str) -> Script {
    let mut script = Script::default();
    let mut commands = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(spec) = line.strip_prefix(ONLY_IF) {
            script.only_if.extend(parse_condition(spec.trim()));
        } else if !line.is_empty() && !line.starts_with('#') {
            commands.push(line);
        }
    }
    if let [only] = commands.as_slice() {
        let words: Vec<&str> = only.split_whitespace().collect();
        if let ["exec", "imgforge-helper", name] = words.as_slice() {
            script.builtin = Some((*name).to_owned());
        }
    }
    script
}

fn parse_condition(spec: &str) -> Option<Condition> {
    if let Some((var, value)) = spec.split_once('=') {
        let (var, value) = (var.trim(), value.trim());
        return (is_variable(var) && !value.is_empty() && !value.contains(char::is_whitespace))
            .then(|| Condition::Equals(var.to_owned(), value.to_owned()));
    }
    let vars: Vec<String> = spec.split_whitespace().map(str::to_owned).collect();
    (!vars.is_empty() && vars.iter().all(|v| is_variable(v))).then_some(Condition::AnySet(vars))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eq(var: &str, value: &str) -> Condition {
        Condition::Equals(var.into(), value.into())
    }

    fn any(vars: &[&str]) -> Condition {
        Condition::AnySet(vars.iter().map(|v| (*v).to_owned()).collect())
    }

    #[test]
    fn scripts() {
        let cases: Vec<(&str, Vec<Condition>, Option<&str>)> = vec![
            ("#!/bin/sh\n# mounts\nexec imgforge-helper mount-root\n", vec![], Some("mount-root")),
            ("#!/bin/sh\n\n  exec   imgforge-helper   unmount  \n", vec![], Some("unmount")),
            ("#!/bin/sh\n. common.sh\nexec imgforge-helper customize\n", vec![], None),
            ("#!/bin/sh\nexec imgforge-helper customize --x\n", vec![], None),
            ("#!/bin/sh\nexec /usr/bin/imgforge-helper customize\n", vec![], None),
            (
                "#!/bin/sh\n# only-if: IMGFORGE_MODE=verify\n. c.sh\n[ x ] || exit 0\n",
                vec![eq("IMGFORGE_MODE", "verify")],
                None,
            ),
            (
                "# only-if: IMGFORGE_RPMS IMGFORGE_INSTALL\n# only-if: IMGFORGE_MODE = customize\nrun\n",
                vec![any(&["IMGFORGE_RPMS", "IMGFORGE_INSTALL"]), eq("IMGFORGE_MODE", "customize")],
                None,
            ),
            ("# only-if: lower=case\n# only-if: A=two words\n# only-if:\n# only-if: A=\nrun\n", vec![], None),
        ];
        for (text, only_if, builtin) in cases {
            let got = parse(text);
            assert_eq!(got.builtin.as_deref(), builtin, "{text:?}");
            assert_eq!(got.only_if, only_if, "{text:?}");
        }
    }

    #[test]
    fn conditions() {
        let vars = [("IMGFORGE_MODE", "verify"), ("IMGFORGE_RPMS", ""), ("IMGFORGE_INSTALL", "vim")];
        let lookup = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        assert!(eq("IMGFORGE_MODE", "verify").holds(lookup));
        assert!(!eq("IMGFORGE_MODE", "customize").holds(lookup));
        assert!(!eq("IMGFORGE_UNSET", "x").holds(lookup));
        assert!(any(&["IMGFORGE_RPMS", "IMGFORGE_INSTALL"]).holds(lookup));
        assert!(!any(&["IMGFORGE_RPMS"]).holds(lookup), "empty is not set");
        assert!(!any(&["IMGFORGE_UNSET"]).holds(lookup));
    }
}
