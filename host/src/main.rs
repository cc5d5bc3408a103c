//! The `imgforge` command.

fn main() -> std::process::ExitCode {
    imgforge::cli::main()
}
