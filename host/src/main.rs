//! The `kiln` command. All logic lives in the library; this only maps the
//! outcome to an exit code.

fn main() -> std::process::ExitCode {
    kiln::cli::main()
}
