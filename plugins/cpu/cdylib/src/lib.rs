//! The CPU backend built as a loadable plugin: `libkiln_cpu_plugin.so`
//! exports `kiln_backend_init`, exactly the entry point that kiln calls for
//! its linked-in copy. A separate crate so that the `kiln-cpu` rlib keeps a
//! hashed file name (a crate that is both rlib and cdylib does not, and
//! builds with different features then overwrite each other's rlib).

kiln_plugin_api::export_backend!(kiln_cpu::CpuBackend);
