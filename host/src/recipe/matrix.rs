//! A recipe's matrix expanded into variants: every combination of the variables' values, the
//! `{variable}` placeholders substituted into operations, names and output names, and each
//! variant's operations parsed by the command line's own parser into a [`Plan`].

use super::{is_plain_name, Recipe, RecipeError, RecipeOp};
use crate::ops::entropy::Entropy;
use crate::ops::{commands_file, operation_options, Plan};

/// The most variants one recipe may expand to: every one is a whole image and a helper run;
/// a matrix past this is a mistake (or an attack) to refuse before expanding it.
pub const MAX_VARIANTS: usize = 1024;

/// The longest file name Linux filesystems take (`NAME_MAX`).
const NAME_MAX_BYTES: usize = 255;

/// One variant of a recipe, its placeholders substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    /// Its unique name (`ath-web`).
    pub name: String,
    /// Variable = value, in the matrix's order.
    pub vars: Vec<(String, String)>,
    /// The output file's name, in the output directory.
    pub output: String,
    /// Its operations in order: the common ones, then those of the rules that match it.
    pub operations: Vec<RecipeOp>,
}

/// Replaces `{NAME}` with its value in `text` (`{{` and `}}` are braces); an unknown name or an
/// unclosed brace is an error naming `line`.
pub fn substitute(text: &str, vars: &[(String, String)], line: usize, file: &str) -> Result<String, RecipeError> {
    let err = |message: String| RecipeError { file: file.to_owned(), line, message };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push(tail.as_bytes()[0] as char);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            // The text is not echoed: it may hold a password (`root-password password:a}b`).
            return Err(err(format!(
                "a lone '}}' at character {} (write '}}}}' for a brace)",
                text.len() - tail.len() + 1
            )));
        }
        let Some(end) = tail.find('}') else {
            return Err(err(format!(
                "an unclosed '{{' at character {} (write '{{{{' for a brace)",
                text.len() - tail.len() + 1
            )));
        };
        let name = &tail[1..end];
        let Some((_, value)) = vars.iter().find(|(k, _)| k == name) else {
            let known: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
            return Err(err(format!("{{{name}}} is not a variable (known: {})", known.join(", "))));
        };
        out.push_str(value);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every variant of `recipe`, in matrix order (the first variable varies slowest).
pub fn expand(recipe: &Recipe, file: &str) -> Result<Vec<Variant>, RecipeError> {
    // Counted before expanding: a few lines of TOML can ask for 2^64 combinations.
    let count = recipe.matrix.iter().try_fold(1usize, |n, (_, values)| n.checked_mul(values.len()));
    if count.is_none_or(|n| n > MAX_VARIANTS) {
        let shown = count.map_or_else(|| "more than 2^64".to_owned(), |n| n.to_string());
        return Err(RecipeError {
            file: file.to_owned(),
            line: 0,
            message: format!(
                "the matrix makes {shown} variants, more than the {MAX_VARIANTS} a build makes: split the recipe"
            ),
        });
    }
    let mut names = std::collections::HashSet::new();
    let mut outputs = std::collections::HashMap::new();
    let mut combinations: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (key, values) in &recipe.matrix {
        combinations = combinations
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    let mut variants: Vec<Variant> = Vec::new();
    for mut vars in combinations {
        let name = match &recipe.name {
            Some(pattern) => substitute(&pattern.text, &vars, pattern.line, file)?,
            None if vars.is_empty() => "default".to_owned(),
            None => vars.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join("-"),
        };
        let name_line = recipe.name.as_ref().map_or(0, |n| n.line);
        if !is_plain_name(&name) {
            return Err(RecipeError {
                file: file.to_owned(),
                line: name_line,
                message: format!("variant name {name:?}: use letters, digits, '.', '_' and '-'"),
            });
        }
        if !names.insert(name.clone()) {
            let other = variants.iter().find(|v| v.name == name).expect("a variant of that name");
            return Err(RecipeError {
                file: file.to_owned(),
                line: name_line,
                message: format!(
                    "two variants are named {name:?} ({:?} and {:?}): put every variable in name",
                    other.vars, vars
                ),
            });
        }
        vars.push(("variant".to_owned(), name.clone()));
        let output = substitute(&recipe.output.text, &vars, recipe.output.line, file)?;
        if !is_plain_name(&output) {
            return Err(RecipeError {
                file: file.to_owned(),
                line: recipe.output.line,
                message: format!("output name {output:?}: a file name of letters, digits, '.', '_' and '-' (no '/')"),
            });
        }
        if output.len() + super::provenance::SUFFIX.len() > NAME_MAX_BYTES {
            return Err(RecipeError {
                file: file.to_owned(),
                line: recipe.output.line,
                message: format!(
                    "output name {output:?} is too long: {} bytes, and its statement adds {}; a file name has at most {NAME_MAX_BYTES}",
                    output.len(),
                    super::provenance::SUFFIX.len()
                ),
            });
        }
        // An output must take neither another's name nor the name of another's statement.
        let statement = format!("{output}{}", super::provenance::SUFFIX);
        let clash = [output.clone(), statement.clone()].into_iter().find_map(|n| outputs.get(&n).cloned());
        if let Some((other, taken)) = clash {
            return Err(RecipeError {
                file: file.to_owned(),
                line: recipe.output.line,
                message: format!(
                    "variants {other} and {name} would both write {taken}: put every variable in output, and no output named like another's {} statement",
                    super::provenance::SUFFIX
                ),
            });
        }
        outputs.insert(output.clone(), (name.clone(), output.clone()));
        outputs.insert(statement.clone(), (name.clone(), statement));
        let matching = recipe
            .rules
            .iter()
            .filter(|r| r.matches.iter().all(|(k, v)| vars.iter().any(|(vk, vv)| vk == k && vv == v)))
            .flat_map(|r| r.operations.iter());
        let operations = recipe
            .operations
            .iter()
            .chain(matching)
            .map(|op| Ok(RecipeOp { line: op.line, text: substitute(&op.text, &vars, op.line, file)? }))
            .collect::<Result<Vec<_>, RecipeError>>()?;
        vars.pop();
        variants.push(Variant { name, vars, output, operations });
    }
    Ok(variants)
}

/// The plan of `operations` (one `--commands-from-file` line each), parsed as the command line
/// parses them, with random choices drawn from `entropy`.
pub fn plan(operations: &[RecipeOp], entropy: Entropy, file: &str) -> Result<Plan, RecipeError> {
    let mut plan = Plan::default();
    plan.entropy = entropy;
    for op in operations {
        let err = |message: String| RecipeError { file: file.to_owned(), line: op.line, message };
        let commands = commands_file::parse(&op.text).map_err(|e| err(e.to_string()))?;
        let [command] = commands.as_slice() else {
            let shown: Vec<String> = commands.iter().map(|c| c.name.clone()).collect();
            return Err(err(format!(
                "{} operations in one string ({}): give one operation per string (NAME ARGUMENT)",
                commands.len(),
                shown.join(", ")
            )));
        };
        if !operation_options().iter().any(|o| o.name == command.name) {
            return Err(err(format!(
                "unknown operation {:?} (use the option names of `imgforge customize --help`, without dashes)",
                command.name
            )));
        }
        plan.add(&command.name, command.arg.as_deref()).map_err(|e| err(e.to_string()))?;
    }
    plan.finish().map_err(|e| RecipeError { file: file.to_owned(), line: 0, message: e.to_string() })?;
    Ok(plan)
}

/// `text` (`NAME ARG`) with what must not be published replaced: password selectors' clear
/// text (`password:PW`), for provenance.
pub fn redacted(text: &str) -> String {
    // What the parser reads, not the raw text: it strips leading blanks and comment lines, so
    // `" root-password password:PW"` sets a password too and must be redacted like it.
    let parsed = commands_file::parse(text);
    let (name, arg) = match parsed.as_deref() {
        Ok([command]) => match &command.arg {
            Some(arg) => (command.name.as_str(), arg.as_str()),
            None => return command.name.clone(),
        },
        _ => return "<redacted: not one operation>".to_owned(),
    };
    let redact_selector = |selector: &str| -> String {
        let (locked, inner) = match selector.strip_prefix("locked:") {
            Some(inner) => ("locked:", inner),
            None => ("", selector),
        };
        if inner.starts_with("password:") {
            format!("{locked}password:<redacted>")
        } else {
            selector.to_owned()
        }
    };
    match name {
        "root-password" => format!("{name} {}", redact_selector(arg)),
        "password" => match arg.split_once(':') {
            Some((user, selector)) => format!("{name} {user}:{}", redact_selector(selector)),
            None => format!("{name} <redacted>"),
        },
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgforge_protocol::rules::Operation;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn recipe(body: &str) -> Recipe {
        super::super::parse("r.toml", &format!("{body}\n[base]\nimage = \"b.img\"\nsha256 = \"{SHA}\"\n")).unwrap()
    }

    #[test]
    fn substitution_table() {
        let vars = vec![("site".to_owned(), "ath".to_owned()), ("role".to_owned(), "web".to_owned())];
        for (text, want) in [
            ("hostname {site}-{role}", "hostname ath-web"),
            ("write /f:{{site}}", "write /f:{site}"),
            ("run-command echo }} {{", "run-command echo } {"),
            ("plain", "plain"),
        ] {
            assert_eq!(substitute(text, &vars, 3, "r").unwrap(), want);
        }
        for (text, want) in [("{nope}", "not a variable"), ("{site", "unclosed"), ("a}b", "lone")] {
            let e = substitute(text, &vars, 7, "r").unwrap_err();
            assert_eq!(e.line, 7);
            assert!(e.message.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_two_by_two_matrix_gives_four_variants() {
        let r = recipe(
            "operations = [\"hostname {site}-{role}\"]\noutput = \"{variant}.raw\"\n\
             [matrix]\nsite = [\"ath\", \"ber\"]\nrole = [\"web\", \"db\"]\n\
             [[variant]]\nmatch = { site = \"ath\", role = \"db\" }\noperations = [\"touch /only-{variant}\"]\n",
        );
        let variants = expand(&r, "r").unwrap();
        let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["ath-web", "ath-db", "ber-web", "ber-db"]);
        assert_eq!(variants[1].output, "ath-db.raw");
        let texts: Vec<&str> = variants[1].operations.iter().map(|o| o.text.as_str()).collect();
        assert_eq!(texts, ["hostname ath-db", "touch /only-ath-db"]);
        assert_eq!(variants[0].operations.len(), 1);
        assert_eq!(
            variants[0].vars,
            vec![("site".to_owned(), "ath".to_owned()), ("role".to_owned(), "web".to_owned())]
        );
        let named =
            expand(&recipe("name = \"{site}.{role}\"\n[matrix]\nsite = [\"a\"]\nrole = [\"x\"]\n"), "r").unwrap();
        assert_eq!((named[0].name.as_str(), named[0].output.as_str()), ("a.x", "a.x.img"));
        assert_eq!(expand(&recipe(""), "r").unwrap()[0].name, "default");
    }

    #[test]
    fn clashing_names_and_outputs_are_refused() {
        let cases = [
            ("name = \"{site}\"\n[matrix]\nsite = [\"a\"]\nrole = [\"x\", \"y\"]\n", "two variants are named"),
            ("output = \"{site}.img\"\n[matrix]\nsite = [\"a\"]\nrole = [\"x\", \"y\"]\n", "would both write"),
            ("output = \"../{variant}\"\n[matrix]\nsite = [\"a\"]\n", "no '/'"),
            ("name = \"{site}/x\"\n[matrix]\nsite = [\"a\"]\n", "variant name"),
        ];
        for (body, want) in cases {
            let e = expand(&recipe(body), "r").unwrap_err();
            assert!(e.message.contains(want), "{body}: {e}");
            assert_eq!(e.line, 1, "{body}: {e}");
        }
    }

    /// Operations go through the command line's parser: the same operations, the same checks.
    #[test]
    fn plans_use_the_command_line_parser() {
        let op = |line, text: &str| RecipeOp { line, text: text.into() };
        let p = plan(
            &[
                op(2, "hostname web-1"),
                op(3, "write /etc/site:ath"),
                op(4, "selinux-relabel"),
                op(5, "reset-machine-id"),
            ],
            Entropy::System,
            "r",
        )
        .unwrap();
        assert_eq!(
            p.operations,
            vec![
                Operation::Hostname { name: "web-1".into() },
                Operation::Write { path: "/etc/site".into(), content: "ath".into() },
                Operation::ResetMachineId,
            ]
        );
        assert!(p.selinux_relabel);
        for (ops, line, want) in [
            (vec![op(9, "hostname bad_name!")], 9, "--hostname"),
            (vec![op(4, "--hostname x")], 4, "without leading dashes"),
            (vec![op(6, "colour blue")], 6, "unknown operation \"colour\""),
            (vec![op(7, "mkdir relative")], 7, "must be absolute"),
            (vec![op(8, "hostname a\nhostname b")], 8, "one operation per string"),
            (vec![op(2, "install vim")], 0, "needs --repo"),
        ] {
            let e = plan(&ops, Entropy::System, "r").unwrap_err();
            assert_eq!(e.line, line, "{ops:?}: {e}");
            assert!(e.message.contains(want), "{ops:?}: {e}");
        }
    }

    /// The same seed gives every variant the same salts, build after build; two variants differ.
    #[test]
    fn seeded_plans_repeat_per_variant() {
        let ops = [RecipeOp { line: 1, text: "root-password password:hunter2".into() }];
        let field = |variant: &str| match &plan(&ops, Entropy::derived("seed", variant), "r").unwrap().operations[0] {
            Operation::Password { shadow_field, .. } => shadow_field.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(field("ath-web"), field("ath-web"));
        assert_ne!(field("ath-web"), field("ath-db"));
        let unseeded = |_: ()| match &plan(&ops, Entropy::System, "r").unwrap().operations[0] {
            Operation::Password { shadow_field, .. } => shadow_field.clone(),
            other => panic!("{other:?}"),
        };
        assert_ne!(unseeded(()), unseeded(()));
    }

    /// Every spelling the command-line parser accepts for a password operation is redacted:
    /// leading blanks, a comment line before it, a locked selector.
    #[test]
    fn redaction_follows_the_parser() {
        for text in [
            " root-password password:hunter2",
            "\troot-password password:hunter2",
            "# the admin password\nroot-password password:hunter2",
            "\n  password alice:password:hunter2",
            "root-password locked:password:hunter2",
        ] {
            let op = RecipeOp { line: 1, text: text.into() };
            assert!(plan(&[op], Entropy::System, "r").is_ok(), "the parser refuses {text:?}");
            let shown = redacted(text);
            assert!(!shown.contains("hunter2"), "{text:?} -> {shown:?}");
            assert!(shown.contains("password:<redacted>"), "{text:?} -> {shown:?}");
        }
    }

    /// Errors about an operation (shown on the terminal, in CI logs) never repeat its password.
    #[test]
    fn errors_never_echo_passwords() {
        let vars = vec![("site".to_owned(), "ath".to_owned())];
        for text in ["root-password password:hun{ter2", "root-password password:hun}ter2"] {
            let e = substitute(text, &vars, 3, "r").unwrap_err();
            assert!(!e.to_string().contains("hun"), "{e}");
            assert_eq!(e.line, 3);
        }
        let op = RecipeOp { line: 4, text: "root-password password:hunter2\nhostname x".into() };
        let e = plan(&[op], Entropy::System, "r").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.message.contains("one operation per string"), "{e}");
    }

    /// A matrix of more variants than a build can make is refused at once, before expansion
    /// (2^20 variants from a few lines of TOML must not take minutes or gigabytes).
    #[test]
    fn huge_matrices_are_refused() {
        let vars = |n: usize| -> String {
            let mut body = String::from("[matrix]\n");
            for i in 0..n {
                body.push_str(&format!("v{i} = [\"a\", \"b\"]\n"));
            }
            body
        };
        let ok = expand(&recipe(&vars(10)), "r").unwrap();
        assert_eq!(ok.len(), 1024);
        for n in [11, 20, 64, 200] {
            let started = std::time::Instant::now();
            let text = format!("{}\n[base]\nimage = \"b.img\"\nsha256 = \"{SHA}\"\n", vars(n));
            let e = super::super::parse("r.toml", &text).and_then(|r| expand(&r, "r.toml")).unwrap_err();
            assert!(e.message.contains("variants"), "{e}");
            assert!(e.message.contains(&MAX_VARIANTS.to_string()), "{e}");
            assert_eq!(e.line, 12, "the line of v10, which crosses the bound: {e}");
            assert!(started.elapsed() < std::time::Duration::from_secs(1), "{n} variables: {:?}", started.elapsed());
        }
    }

    /// An output must not take the name of another output's provenance statement.
    #[test]
    fn outputs_do_not_collide_with_provenance_files() {
        let body = "output = \"{site}\"\n[matrix]\nsite = [\"x.img\", \"x.img.provenance.json\"]\n";
        let e = expand(&recipe(body), "r").unwrap_err();
        assert!(e.message.contains("x.img.provenance.json"), "{e}");
        let reversed = "output = \"{site}\"\n[matrix]\nsite = [\"x.img.provenance.json\", \"x.img\"]\n";
        assert!(expand(&recipe(reversed), "r").is_err());
    }

    /// An output name too long for a file name (with its statement's suffix and the temporary
    /// name's) is refused by the recipe check, not by the final rename after the helper ran.
    #[test]
    fn overlong_output_names_are_refused() {
        let long = "a".repeat(236);
        let e = expand(&recipe(&format!("[matrix]\nsite = [\"{long}\"]\n")), "r").unwrap_err();
        assert!(e.message.contains("too long"), "{e}");
        let fits = "a".repeat(150);
        assert!(expand(&recipe(&format!("[matrix]\nsite = [\"{fits}\"]\n")), "r").is_ok());
    }

    #[test]
    fn redaction_table() {
        for (text, want) in [
            ("root-password password:hunter2", "root-password password:<redacted>"),
            ("root-password locked:password:x", "root-password locked:password:<redacted>"),
            ("root-password random", "root-password random"),
            ("root-password file:/etc/pw", "root-password file:/etc/pw"),
            ("password alice:password:x:y", "password alice:password:<redacted>"),
            ("password alice:disabled", "password alice:disabled"),
            ("password garbage", "password <redacted>"),
            ("hostname web", "hostname web"),
            ("selinux-relabel", "selinux-relabel"),
        ] {
            assert_eq!(redacted(text), want, "{text}");
        }
    }
}
