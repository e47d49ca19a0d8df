//! `kiln doctor`: everything kiln depends on, checked, with advice for each
//! problem. Exit code 1 when it found a problem.

use super::{CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_plugin_api::{KILN_ABI_VERSION_MAJOR, KILN_ABI_VERSION_MINOR, KILN_LAYOUT_FINGERPRINT};
use kiln_registry::config::Config;
use kiln_registry::{PluginState, Registry};
use kiln_runtime::backend::{Backend, BackendSet, BackendSource};
use kiln_runtime::cpu_features;
use kiln_runtime::plugin::{self, MANIFEST_FILE};
use serde_json::{Value, json};
use std::process::ExitCode;

pub fn doctor(config: &Config, as_json: bool) -> CliResult {
    let mut problems: Vec<String> = Vec::new();
    if let Some(e) = &config.config_error {
        problems.push(e.clone());
    }

    let features = cpu_features::report();
    let xcr0 = cpu_features::xcr0();
    let cpu = Backend::builtin_cpu();
    let cpu_name = cpu
        .devices
        .first()
        .map(|d| d.name.clone())
        .unwrap_or_default();

    let dirs: Vec<Value> = config
        .plugin_dirs
        .iter()
        .map(|d| {
            let exists = d.path.is_dir();
            if !exists && d.origin != kiln_registry::config::DirOrigin::Home {
                problems.push(format!(
                    "plugin directory {} ({:?}) does not exist",
                    d.path.display(),
                    d.origin
                ));
            }
            json!({"path": d.path, "origin": d.origin, "exists": exists})
        })
        .collect();

    let registry = match Registry::open(&config.registry_path()) {
        Ok(r) => Some(r),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let (registry_json, flagged) = match &registry {
        Some(r) => registry_report(r, &mut problems),
        None => (
            json!({"path": config.registry_path(), "usable": false}),
            Vec::new(),
        ),
    };

    let installed = registry
        .as_ref()
        .and_then(|r| r.plugins().ok())
        .unwrap_or_default();
    let discovered: Vec<Value> = plugin::discover(config)
        .into_iter()
        .map(|d| {
            let status = match plugin::preflight(&d.manifest_path) {
                Ok(v) => {
                    let is_installed = installed
                        .iter()
                        .any(|p| p.name == v.manifest.name && p.sha256 == v.sha256);
                    if is_installed {
                        "installed"
                    } else {
                        "not installed"
                    }
                    .to_string()
                }
                Err(e) => {
                    problems.push(format!(
                        "plugin {} would be refused: {e}",
                        d.manifest_path.display()
                    ));
                    format!("refused: {e}")
                }
            };
            json!({"manifest": d.manifest_path, "status": status})
        })
        .collect();

    // Every active backend loaded, its devices listed, and what the
    // plugins said while loading (why a device was skipped or hidden).
    let mut plugin_notes = Vec::new();
    let mut backends = Vec::new();
    if let Some(r) = &registry {
        let _ = kiln_runtime::backend::take_plugin_warnings();
        let set = BackendSet::load(r);
        plugin_notes = kiln_runtime::backend::take_plugin_warnings();
        // A plugin that failed preflight above is not reported twice.
        problems.extend(set.problems.into_iter().filter(|p| {
            !flagged
                .iter()
                .any(|label| p.starts_with(&format!("plugin {label} ")))
        }));
        for b in &set.backends {
            let version = match &b.source {
                BackendSource::Plugin { version, .. } => Some(version.clone()),
                BackendSource::Builtin => None,
            };
            let devices: Vec<Value> = (b.devices.iter().enumerate())
                .map(|(i, d)| {
                    json!({
                        "device": i, "name": d.name, "kind": d.kind.name(),
                        "total_memory": d.total_memory, "free_memory": d.free_memory,
                    })
                })
                .collect();
            backends.push(json!({
                "name": b.name(), "version": version, "devices": devices,
                "isolation": b.handle().isolation(),
                "worker_pid": b.handle().worker().and_then(|w| w.pid()),
            }));
        }
    }

    // Who ranks context, and its parameters' values from config.toml (a
    // value the policy cannot take is a problem to fix there).
    let mut ranking_notes = Vec::new();
    let (ranker, param_problems) =
        kiln_serve::start::ranker_checked(config, &mut |m| ranking_notes.push(m));
    problems.extend(param_problems);
    let (ranking_policy, declared) = ranker.declared();
    let ranking = json!({
        "policy": ranker.policy().map_or("builtin".to_string(), |p| p.meta.label()),
        "params_of": ranking_policy,
        "params": declared.iter().map(|(d, v)| (d.name.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "notes": ranking_notes,
    });

    // What each active model needs against the memory available now.
    let available = kiln_runtime::measure::proc_kib_field("/proc/meminfo", "MemAvailable");
    let mut models = Vec::new();
    let all_models = registry
        .as_ref()
        .map(|r| r.models().unwrap_or_default())
        .unwrap_or_default();
    for m in &all_models {
        if m.state != "active" {
            continue;
        }
        let kv_type =
            super::kv_type_for(config, &m.label(), None).unwrap_or(kiln_plugin_api::DType::F16);
        // On the CPU, with the KV caches of the requests it decodes
        // together, as many as fit (as `kiln serve` does).
        let budget = kiln_runtime::model::session::budget(&m.blob_path, None, kv_type)
            .map(|b| b.fitting(config.engine.decode_batch(), available.unwrap_or(u64::MAX)));
        match budget {
            Ok(b) => {
                let fits = available.is_none_or(|a| b.total_bytes <= a);
                if !fits {
                    problems.push(format!(
                        "model {} needs {} but {} MiB are available; close programs, run it with a smaller --ctx, or use a smaller quantization",
                        m.label(),
                        b.describe(),
                        available.unwrap_or(0) >> 20,
                    ));
                }
                let mut v = serde_json::to_value(&b).unwrap_or_default();
                v["model"] = json!(m.label());
                v["fits"] = json!(fits);
                models.push(v);
            }
            Err(e) => {
                problems.push(format!(
                    "model {} cannot be read ({e}); `kiln models verify`",
                    m.label()
                ));
                models.push(json!({"model": m.label(), "error": e.to_string()}));
            }
        }
    }

    // The models config.toml's [models] name for `kiln serve`, each against
    // the pool's budget; a route naming a model no entry defines (it must
    // come from `kiln serve --model`).
    let pool_budget = (config.pool.max_memory_mb.map(|mb| mb << 20)).or(available);
    let budget_from = if config.pool.max_memory_mb.is_some() {
        "[pool] max_memory_mb"
    } else {
        "the memory available"
    };
    let mut pool_models = Vec::new();
    for (name, entry) in &config.models {
        let what = format!("[models.{name}]");
        let need = kiln_runtime::store::resolve_served(config, Some(&entry.model))
            .map_err(|e| e.to_string())
            .and_then(|(_, path)| {
                let kv =
                    super::kv_type_for(config, name, None).unwrap_or(kiln_plugin_api::DType::F16);
                let header =
                    kiln_runtime::gguf::GgufFile::open_header(&path).map_err(|e| e.to_string())?;
                let b = kiln_runtime::model::session::budget_of(&header, entry.ctx, kv)
                    .map_err(|e| e.to_string())?;
                // Its adapter, checked against it as `kiln serve` checks
                // it before loading; its pairs held beside the weights.
                match &entry.adapter {
                    Some(a) => kiln_runtime::store::adapter_for_model(config, a, &header)
                        .map(|(_, applied)| b.with_weights(applied.bytes)),
                    None => Ok(b),
                }
            });
        // On a plugin's device: its weights there, only its KV cache and
        // work space copied on the host.
        let device = entry
            .backend
            .as_deref()
            .filter(|b| !b.starts_with("cpu"))
            .map(|b| {
                b.split_once(':')
                    .map_or((b, 0), |(n, d)| (n, d.parse().unwrap_or(0)))
            });
        match need {
            Ok(b) => {
                // On the CPU, with the KV caches of the requests it
                // decodes together, as many as the budget holds.
                let b = match device {
                    Some(_) => b,
                    None => b.fitting(
                        config.engine.decode_batch(),
                        pool_budget.unwrap_or(u64::MAX),
                    ),
                };
                let host_need = match device {
                    Some(_) => b.kv_bytes + b.scratch_bytes,
                    None => b.total_bytes,
                };
                let fits = pool_budget.is_none_or(|a| host_need <= a);
                if let Some((backend, d)) = device {
                    let free = (backends.iter())
                        .find(|x| x["name"] == backend)
                        .and_then(|x| x["devices"][d]["free_memory"].as_u64());
                    let (budget, from) = match config.pool.max_device_memory_mb {
                        Some(mb) => (Some(mb << 20), "[pool] max_device_memory_mb"),
                        None => (free, "its free memory"),
                    };
                    if let Some(budget) = budget.filter(|&x| b.total_bytes > x) {
                        problems.push(format!(
                            "{what} ({}) needs {} MiB of {backend}:{d}'s memory but its budget ({from}) is {} MiB: kiln serve refuses to load it; raise [pool] max_device_memory_mb, give it a smaller ctx, or use a smaller quantization",
                            entry.model,
                            b.total_bytes >> 20,
                            budget >> 20,
                        ));
                    }
                }
                if !fits {
                    problems.push(format!(
                        "{what} ({}) needs {} MiB of host memory (in all {}) but the pool's budget ({budget_from}) is {} MiB: kiln serve refuses to load it; raise [pool] max_memory_mb, give it a smaller ctx, or use a smaller quantization",
                        entry.model,
                        host_need >> 20,
                        b.describe(),
                        pool_budget.unwrap_or(0) >> 20,
                    ));
                }
                let mut v = serde_json::to_value(&b).unwrap_or_default();
                v["model"] = json!(what);
                v["fits"] = json!(fits);
                pool_models.push(v);
            }
            Err(e) => {
                problems.push(format!(
                    "{what} model = {:?} cannot be served: {e}",
                    entry.model
                ));
                pool_models.push(json!({"model": what, "error": e}));
            }
        }
    }
    let mut route_notes = Vec::new();
    for (i, r) in config.routes.iter().enumerate() {
        for m in r.models.iter().filter(|m| !config.models.contains_key(*m)) {
            route_notes.push(format!(
                "[[routes]] #{} names {m:?}, which no [models] entry defines: kiln serve starts only with it given as --model",
                i + 1
            ));
        }
    }
    models.extend(pool_models);

    // Encryption at rest: the setting, the key file's permissions, and
    // blobs not in the form the setting asks for.
    let keys = kiln_runtime::crypt::Keys::from_env(config);
    let identity = match &keys {
        Ok(k) => k.identity_file.clone(),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let identity_mode = identity.as_ref().and_then(|p| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
    });
    if let (Some(p), Some(mode)) = (&identity, identity_mode)
        && mode & 0o077 != 0
    {
        problems.push(format!(
            "the identity {} can be read by other users (mode {mode:03o}); `chmod 600 {}`",
            p.display(),
            p.display()
        ));
    }
    let encrypted = all_models.iter().filter(|m| m.encrypted).count();
    let plain = all_models.len() - encrypted;
    if config.encrypt_at_rest && plain > 0 {
        problems.push(format!(
            "{plain} model version(s) are stored in plain although encrypt_at_rest is on; `kiln store encrypt` encrypts them"
        ));
    }

    let report = json!({
        "schema_version": JSON_SCHEMA_VERSION,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "abi": {
            "version": format!("{KILN_ABI_VERSION_MAJOR}.{KILN_ABI_VERSION_MINOR}"),
            "layout_fingerprint": format!("{KILN_LAYOUT_FINGERPRINT:#018x}"),
        },
        "platform": {"os": std::env::consts::OS, "arch": std::env::consts::ARCH},
        "cpu": {
            "name": cpu_name,
            "features": features,
            "xcr0": xcr0.map(|x| format!("{x:#x}")),
            "xcr0_components": xcr0.map(cpu_features::xcr0_components),
            "kernels": kiln_cpu::kernels::Isa::current().name(),
            "threads": kiln_cpu::kernels::threads(),
        },
        "home": config.home,
        "config_file": {
            "path": config.config_file,
            "exists": config.config_file.is_file(),
            "error": config.config_error,
        },
        "plugin_dirs": dirs,
        "registry": registry_json,
        "discovered_plugins": discovered,
        "backends": backends,
        "plugin_notes": plugin_notes,
        "memory": {
            "available_bytes": available,
            "huge_pages": kiln_runtime::measure::huge_pages_mode(),
        },
        "models": models,
        "pool": {
            "budget_bytes": pool_budget,
            "budget_from": budget_from,
            "routes": config.routes,
            "notes": route_notes,
        },
        "ranking": ranking,
        "encryption": {
            "at_rest": config.encrypt_at_rest,
            "identity": identity,
            "identity_mode": identity_mode.map(|m| format!("{m:03o}")),
            "encrypted_models": encrypted,
            "plain_models": plain,
        },
        "problems": problems,
    });

    if as_json {
        print_json(&report);
    } else {
        print_human(&report);
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The registry's state; adds its problems, and returns the labels of the
/// active plugins that no longer pass preflight with it.
fn registry_report(r: &Registry, problems: &mut Vec<String>) -> (Value, Vec<String>) {
    let integrity = r.integrity_check().unwrap_or_else(|e| e.to_string());
    if integrity != "ok" {
        problems.push(format!(
            "registry {} fails its integrity check: {integrity}; restore a backup or move it away",
            r.path().display()
        ));
    }
    let plugins = r.plugins().unwrap_or_default();
    let count = |s: PluginState| plugins.iter().filter(|p| p.state == s).count();
    let mut flagged = Vec::new();
    for p in plugins.iter().filter(|p| p.state == PluginState::Active) {
        let checked = plugin::preflight(&p.manifest_path);
        if !matches!(&checked, Ok(v) if v.sha256 == p.sha256) {
            flagged.push(p.label());
        }
        match checked {
            Ok(v) if v.sha256 == p.sha256 => {}
            Ok(v) => problems.push(format!(
                "active plugin {}: the stored library changed (sha256 {} expected {}); re-add it or `kiln plugins rollback {}`",
                p.label(),
                v.sha256,
                p.sha256,
                p.name
            )),
            Err(e) => problems.push(format!(
                "active plugin {} no longer passes preflight: {e}; `kiln plugins disable {}` or re-add it",
                p.label(),
                p.name
            )),
        }
    }
    let report = json!({
        "path": r.path(),
        "usable": true,
        "schema_version": r.schema_version().ok(),
        "integrity": integrity,
        "plugins": {
            "active": count(PluginState::Active),
            "inactive": count(PluginState::Inactive),
            "disabled": count(PluginState::Disabled),
        },
    });
    (report, flagged)
}

fn print_human(r: &Value) {
    let s = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    println!(
        "kiln {} (backend ABI {}, layout {})",
        s(&r["kiln_version"]),
        s(&r["abi"]["version"]),
        s(&r["abi"]["layout_fingerprint"])
    );
    println!(
        "platform     {} {}",
        s(&r["platform"]["os"]),
        s(&r["platform"]["arch"])
    );
    println!("cpu          {}", s(&r["cpu"]["name"]));
    let params: Vec<String> = (r["ranking"]["params"].as_object().into_iter().flatten())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "ranking      {} ({})",
        s(&r["ranking"]["policy"]),
        params.join(" ")
    );
    let have: Vec<String> = r["cpu"]["features"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["available"] == true)
        .map(|f| s(&f["name"]))
        .collect();
    println!("features     {}", have.join(" "));
    if let Some(x) = r["cpu"]["xcr0"].as_str() {
        let comps: Vec<String> = r["cpu"]["xcr0_components"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        println!("os state     XCR0 {x}: {}", comps.join(" "));
    }
    println!(
        "cpu kernels  {} ({} threads; KILN_CPU_ISA, KILN_THREADS)",
        s(&r["cpu"]["kernels"]),
        r["cpu"]["threads"]
    );
    println!("home         {}", s(&r["home"]));
    let cfg = &r["config_file"];
    println!(
        "config       {} ({})",
        s(&cfg["path"]),
        if cfg["exists"] == true {
            "present"
        } else {
            "absent: defaults"
        }
    );
    for d in r["plugin_dirs"].as_array().into_iter().flatten() {
        println!(
            "plugin dir   {} [{}]{}",
            s(&d["path"]),
            s(&d["origin"]),
            if d["exists"] == true {
                ""
            } else {
                " (not present)"
            }
        );
    }
    let reg = &r["registry"];
    if reg["usable"] == true {
        println!(
            "registry     {} (schema {}, integrity {}; plugins: {} active, {} inactive, {} disabled)",
            s(&reg["path"]),
            s(&reg["schema_version"]),
            s(&reg["integrity"]),
            reg["plugins"]["active"],
            reg["plugins"]["inactive"],
            reg["plugins"]["disabled"]
        );
    } else {
        println!("registry     {} (unusable)", s(&reg["path"]));
    }
    for d in r["discovered_plugins"].as_array().into_iter().flatten() {
        println!(
            "found        {} : {}",
            s(&d["manifest"]).trim_end_matches(MANIFEST_FILE),
            s(&d["status"])
        );
    }
    for b in r["backends"].as_array().into_iter().flatten() {
        let label = match b["version"].as_str() {
            Some(v) => format!("{}@{v}", s(&b["name"])),
            None => s(&b["name"]).to_string(),
        };
        let devices = b["devices"].as_array().cloned().unwrap_or_default();
        if devices.is_empty() {
            println!("backend      {label}: no devices");
        }
        for d in devices {
            let gib = d["total_memory"].as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64;
            println!(
                "backend      {label}:{} {} ({}, {gib:.1} GiB)",
                d["device"],
                s(&d["name"]),
                s(&d["kind"])
            );
        }
    }
    for n in r["plugin_notes"].as_array().into_iter().flatten() {
        println!("plugin said  {}", s(n));
    }
    let enc = &r["encryption"];
    println!(
        "encryption   {} ({} model version(s) encrypted, {} plain; identity {})",
        if enc["at_rest"] == true {
            "at rest: new models are stored encrypted"
        } else {
            "off (`kiln store encrypt`)"
        },
        enc["encrypted_models"],
        enc["plain_models"],
        enc["identity"].as_str().unwrap_or("none")
    );
    let mib = |v: &Value| v.as_u64().unwrap_or(0) >> 20;
    if let Some(a) = r["memory"]["available_bytes"].as_u64() {
        println!("memory       {} MiB available", a >> 20);
    }
    println!(
        "huge pages   {}",
        match r["memory"]["huge_pages"].as_str() {
            Some("never") => "off (transparent huge pages: never); kiln runs on 4 KiB pages".into(),
            Some(mode) => format!(
                "transparent huge pages: {mode}; kiln asks for them for weights copied into memory, KV caches and work spaces"
            ),
            None => "none (no transparent huge pages in this kernel)".into(),
        }
    );
    for m in r["models"].as_array().into_iter().flatten() {
        if m["error"].is_string() {
            continue; // among the problems
        }
        println!(
            "model        {}: {} MiB ({} weights, {} KV at {} tokens{}, {} work space){}",
            s(&m["model"]),
            mib(&m["total_bytes"]),
            mib(&m["weights_bytes"]),
            (m["kv_bytes"].as_u64().unwrap_or(0) + m["batch_kv_bytes"].as_u64().unwrap_or(0)) >> 20,
            m["n_ctx"],
            match m["sequences"].as_u64() {
                Some(n) if n > 1 => format!(" for each of {n} requests decoded together"),
                _ => String::new(),
            },
            mib(&m["scratch_bytes"]),
            if m["fits"] == true {
                ""
            } else {
                ": does not fit"
            }
        );
    }
    if let Some(b) = r["pool"]["budget_bytes"].as_u64() {
        println!(
            "pool         {} MiB ({}), {} route(s)",
            b >> 20,
            s(&r["pool"]["budget_from"]),
            r["pool"]["routes"].as_array().map_or(0, Vec::len)
        );
    }
    for n in r["pool"]["notes"].as_array().into_iter().flatten() {
        println!("             {}", s(n));
    }
    let problems = r["problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        println!("\nNo problems found.");
    } else {
        println!("\n{} problem(s):", problems.len());
        for p in problems {
            println!("  - {}", s(&p));
        }
    }
}
