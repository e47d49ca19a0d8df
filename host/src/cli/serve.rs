//! `kiln serve`

use super::{CliError, CliResult};
use kiln_serve::lsp;
use kiln_serve::start::{ServeSpec, start_engine};
use std::net::SocketAddr;
use std::process::ExitCode;

pub fn run(spec: ServeSpec, http: Option<&str>, allow_remote: bool) -> CliResult {
    let Some(addr) = http else {
        // The language server: stdout carries the protocol, so everything
        // kiln says goes to stderr or window/logMessage.
        let code = lsp::run(
            spec,
            Box::new(std::io::stdin()),
            Box::new(std::io::stdout()),
        );
        return Ok(ExitCode::from(code as u8));
    };
    let addr: SocketAddr = addr.parse().map_err(|_| {
        CliError(format!(
            "--http {addr:?} is not an address; write it as 127.0.0.1:8080"
        ))
    })?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(CliError(format!(
            "--http {addr} would serve other machines; kiln serves only this one unless you pass --allow-remote"
        )));
    }
    let engine = start_engine(&spec, None).map_err(CliError)?;
    let loaded = engine.loaded();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError(format!("cannot listen on {addr}: {e}")))?;
        let bound = listener.local_addr()?;
        eprintln!(
            "kiln: serving {} ({}, FIM template {}) on http://{bound}",
            loaded.id,
            loaded.path.display(),
            loaded.fim.name()
        );
        tokio::select! {
            r = kiln_serve::http::serve(engine.clone(), listener) => r?,
            _ = tokio::signal::ctrl_c() => eprintln!("kiln: stopping"),
        }
        engine.shutdown();
        Ok::<_, CliError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
