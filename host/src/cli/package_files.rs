//! `imgforge generate`, hidden: the files a package ships besides the binary, made by the
//! binary itself so that they describe exactly the program they come with (the man pages and
//! completions from its clap definitions, the settings file from its defaults). A subcommand
//! rather than an xtask: `scripts/package.sh` runs the binary it packages, with nothing else to
//! build, and a page can never describe another build than the one shipped.

use crate::cli::exit::Failure;
use clap::ArgMatches;
use std::path::PathBuf;

/// The hidden `generate` command, added to the parser next to the documented ones.
pub fn command() -> clap::Command {
    clap::Command::new("generate")
        .hide(true)
        .about("Write what a package ships besides the binary (man pages, completions, settings file)")
        .subcommand_required(true)
        .subcommand(
            clap::Command::new("man")
                .about("Write the manual pages (NAME.1) into DIR")
                .arg(clap::Arg::new("dir").value_name("DIR").required(true).value_parser(clap::value_parser!(PathBuf))),
        )
        .subcommand(
            clap::Command::new("completions").about("Print the completion script of SHELL").arg(
                clap::Arg::new("shell")
                    .value_name("SHELL")
                    .required(true)
                    .value_parser(clap::value_parser!(clap_complete::Shell)),
            ),
        )
        .subcommand(
            clap::Command::new("default-config").about("Print /etc/default/imgforge with every setting commented"),
        )
}

/// Runs `generate`'s subcommand.
pub fn run(matches: &ArgMatches) -> Result<(), Failure> {
    match matches.subcommand() {
        Some(("man", sub)) => {
            let dir = sub.get_one::<PathBuf>("dir").expect("required");
            crate::cli::man_pages::write_all(&crate::cli::command(), dir).map_err(|e| {
                Failure::environment(format!("cannot write the manual pages into {}: {e}", dir.display()))
            })?;
            Ok(())
        }
        Some(("completions", sub)) => {
            let shell = *sub.get_one::<clap_complete::Shell>("shell").expect("required");
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut crate::cli::command(), "imgforge", &mut script);
            crate::stdio::out(&String::from_utf8_lossy(&script));
            Ok(())
        }
        Some(("default-config", _)) => {
            crate::stdio::out(&crate::ganeti::config::commented_defaults());
            Ok(())
        }
        _ => Err(Failure::bad_input("generate: give man DIR, completions SHELL or default-config")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_completions_offer_the_options_and_leave_out_the_hidden_command() {
        let mut script = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut crate::cli::command(), "imgforge", &mut script);
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("--hostname") && script.contains("install-os"), "{script}");
        assert!(script.contains("imgforge,customize)"), "{script}");
        assert!(!script.contains("imgforge,generate)"), "the hidden command is not offered");
    }
}
