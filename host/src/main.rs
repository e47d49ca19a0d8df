//! The `kiln` command: argument parsing, output (tables, `--json`) and
//! the demo, over `kiln-serve`, `kiln-runtime` and `kiln-registry`.

mod cli;

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `kiln … | head` would panic on the closed
    // pipe; restore the default so kiln ends quietly like other tools.
    #[cfg(unix)]
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    cli::main()
}
