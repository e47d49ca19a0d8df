//! `kiln serve`

use super::{CliError, CliResult};
use kiln_serve::dashboard::Dashboard;
use kiln_serve::lsp;
use kiln_serve::metrics::Metrics;
use kiln_serve::start::{ServeSpec, start_pool};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Where `kiln serve` listens besides stdio.
pub struct Listen<'a> {
    /// `--http`: the OpenAI-compatible API instead of the language server.
    pub http: Option<&'a str>,
    /// `--metrics`: `/metrics` and `/healthz` beside the language server.
    pub metrics: Option<&'a str>,
    pub allow_remote: bool,
    /// `--dashboard-interval`: seconds between the dashboard's snapshots.
    pub dashboard_interval: u64,
}

/// A listening address: loopback unless `allow_remote`.
fn address(flag: &str, addr: &str, allow_remote: bool) -> Result<SocketAddr, CliError> {
    let parsed: SocketAddr = addr.parse().map_err(|_| {
        CliError(format!(
            "{flag} {addr:?} is not an address; write it as 127.0.0.1:8080"
        ))
    })?;
    if !parsed.ip().is_loopback() && !allow_remote {
        return Err(CliError(format!(
            "{flag} {parsed} would serve other machines; kiln serves only this one unless you pass --allow-remote"
        )));
    }
    Ok(parsed)
}

pub fn run(mut spec: ServeSpec, listen: Listen<'_>) -> CliResult {
    if !(1..=60).contains(&listen.dashboard_interval) {
        return Err(CliError(format!(
            "--dashboard-interval {} is out of range; give 1 to 60 seconds",
            listen.dashboard_interval
        )));
    }
    let metrics = Arc::new(Metrics::default());
    kiln_serve::scrub::start(spec.config.clone(), metrics.clone());
    let dashboard = || {
        Dashboard::start(
            metrics.clone(),
            Some(spec.config.clone()),
            Duration::from_secs(listen.dashboard_interval),
        )
    };
    let Some(addr) = listen.http else {
        let mut run_file = None;
        if let Some(m) = listen.metrics {
            let addr = address("--metrics", m, listen.allow_remote)?;
            let dashboard = dashboard();
            let bound = metrics_endpoint(addr, metrics.clone(), dashboard.clone())?;
            dashboard.listening_on(bound.to_string());
            run_file =
                super::top::announce(&spec.config, &bound.to_string(), spec.model.as_deref());
            eprintln!(
                "kiln: metrics on http://{bound}/metrics, dashboard on http://{bound}/dashboard"
            );
            spec.metrics_address = Some(bound.to_string());
        }
        // The language server: stdout carries the protocol, so everything
        // kiln says goes to stderr or window/logMessage.
        let code = lsp::run(
            spec,
            metrics,
            Box::new(std::io::stdin()),
            Box::new(std::io::stdout()),
        );
        drop(run_file);
        return Ok(ExitCode::from(code as u8));
    };
    if listen.metrics.is_some() {
        return Err(CliError(
            "--metrics goes with the language server; --http serves /metrics itself".into(),
        ));
    }
    let addr = address("--http", addr, listen.allow_remote)?;
    let dashboard = dashboard();
    let pool = start_pool(&spec, None, metrics).map_err(CliError)?;
    let loaded = pool.first().loaded();
    let config = spec.config.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError(format!("cannot listen on {addr}: {e}")))?;
        let bound = listener.local_addr()?;
        dashboard.listening_on(bound.to_string());
        let _run_file = super::top::announce(&config, &bound.to_string(), Some(&loaded.id));
        eprintln!(
            "kiln: serving {} ({}, FIM template {}) on http://{bound}",
            loaded.id,
            loaded.path.display(),
            loaded.fim.name()
        );
        let ids = pool.ids();
        if ids.len() > 1 {
            eprintln!(
                "kiln: also serving {} (loaded when first asked for)",
                ids[1..].join(", ")
            );
        }
        eprintln!("kiln: dashboard at http://{bound}/dashboard");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // SIGHUP: config.toml read again; its models, routes and [pool]
        // take effect.
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let (p, file) = (pool.clone(), config.config_file.clone());
        let home = config.home.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let (p, file, home) = (p.clone(), file.clone(), home.clone());
                let said = tokio::task::spawn_blocking(move || {
                    let fresh = kiln_registry::config::Config::with_file(
                        home,
                        std::env::var_os("KILN_PLUGIN_PATH").as_deref(),
                        Some(file.clone()),
                    );
                    match p.reload(&fresh) {
                        Ok(gone) if gone.is_empty() => format!(
                            "kiln: {} read again (SIGHUP): serving {}",
                            file.display(),
                            p.ids().join(", ")
                        ),
                        Ok(gone) => format!(
                            "kiln: {} read again (SIGHUP): serving {}; unloaded {}",
                            file.display(),
                            p.ids().join(", "),
                            gone.join(", ")
                        ),
                        Err(e) => format!("kiln: {e}; the configuration in use stays"),
                    }
                })
                .await;
                if let Ok(line) = said {
                    eprintln!("{line}");
                }
            }
        });
        tokio::select! {
            r = kiln_serve::http::serve(pool.clone(), dashboard, listener) => r?,
            _ = tokio::signal::ctrl_c() => eprintln!("kiln: stopping"),
            _ = terminate.recv() => eprintln!("kiln: stopping (SIGTERM)"),
        }
        pool.shutdown();
        Ok::<_, CliError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Serves `/metrics`, `/healthz` and `/dashboard` on `addr` from a thread of its own;
/// returns the bound address.
fn metrics_endpoint(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    dashboard: Arc<Dashboard>,
) -> Result<SocketAddr, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| CliError(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("kiln-metrics".into())
        .spawn(move || {
            let _ = runtime.block_on(kiln_serve::http::serve_metrics(
                metrics, dashboard, listener,
            ));
        })?;
    Ok(bound)
}
