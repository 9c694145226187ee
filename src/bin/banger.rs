//! banger: the command-line client of bangerd.

fn main() -> std::process::ExitCode {
    banger::cli::main()
}
