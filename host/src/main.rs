//! The `kiln` command. All logic lives in the library; this only maps the
//! outcome to an exit code.

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `kiln … | head` would panic on the closed
    // pipe; restore the default so kiln ends quietly like other tools.
    #[cfg(unix)]
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    kiln::cli::main()
}
