//! The `kiln` command: argument parsing, output (tables, `--json`) and
//! the demo, over `kiln-serve`, `kiln-runtime` and `kiln-registry`.

mod cli;

/// mimalloc, not the system's malloc: see host/Cargo.toml. The libraries
/// leave the choice to the program that embeds them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, so `kiln … | head` would panic on the closed
    // pipe; restore the default so kiln ends quietly like other tools.
    #[cfg(unix)]
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A plugin's worker process (started by kiln itself; see
    // kiln_runtime::backend::worker), before any argument parsing.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 4 && args[1] == "plugin-worker" {
        let generation = args[3].to_str().and_then(|g| g.parse().ok()).unwrap_or(1);
        let code = kiln_runtime::backend::worker::worker_main(args[2].as_ref(), generation);
        return std::process::ExitCode::from(code as u8);
    }
    cli::main()
}
