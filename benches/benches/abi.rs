//! The cost of crossing the backend ABI, against a direct call.
//!
//! - `abi_call/*`: one table call (`device_count`, `supports_op`) through
//!   the function pointers, the glue's checks and `catch_unwind`, on the
//!   built-in CPU backend (Rust glue) and on the C fixture (a bare C table);
//!   the peer is the same work as a direct Rust call.
//! - `graph_round_trip/*`: one single-op graph (scale 16 floats) submitted
//!   and synchronised on resident buffers; the peer runs the same op through
//!   `kiln_cpu::ops::run` directly. `c-fixture-worker` is the C fixture in a
//!   worker process (plugin isolation): two messages each way per round
//!   trip, the graph through the shared arena.
//!
//! `cargo bench -p kiln-benches --bench abi`

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_cpu::ops::{Desc, View};
use kiln_plugin_api::abi::{KilnOp, KilnTensor};
use kiln_plugin_api::host::{BackendHandle, HostSink, host_api, open_library};
use kiln_plugin_api::types::f32_param;
use kiln_plugin_api::{DType, ErrorCode, OpKind};
use kiln_runtime::backend::worker::{Limits, Worker};
use kiln_runtime::backend::{Backend, Handle};
use std::hint::black_box;

struct Quiet;
impl HostSink for Quiet {
    fn log(&self, _: i32, _: &str) {}
    fn report_error(&self, _: ErrorCode, _: &str) {}
}

fn c_fixture() -> BackendHandle {
    let lib = kiln_tests::c_fixture("kiln_bench_fixture", &["-O2"]);
    // SAFETY: a fixture built from this repository's source.
    unsafe {
        BackendHandle::negotiate(open_library(&lib).unwrap(), host_api(Box::new(Quiet))).unwrap()
    }
}

fn scale_op() -> KilnOp {
    KilnOp {
        kind: OpKind::Scale.raw(),
        n_src: 1,
        src: [0, 0, 0, 0],
        dst: 1,
        flags: 0,
        params: [f32_param(0.5), 0, 0, 0, 0, 0, 0, 0],
    }
}

fn tensor(buffer: *mut core::ffi::c_void) -> KilnTensor {
    KilnTensor {
        buffer,
        offset: 0,
        dtype: DType::F32.raw(),
        n_dims: 1,
        ne: [16, 1, 1, 1],
        nb: [4, 64, 64, 64],
    }
}

/// The built-in CPU backend's negotiated table.
fn cpu_table(cpu: &Backend) -> &BackendHandle {
    match cpu.handle() {
        Handle::InProcess(h) => h,
        Handle::Worker(_) => unreachable!("the built-in CPU runs in kiln's process"),
    }
}

fn abi_calls(c: &mut Criterion) {
    let cpu = Backend::builtin_cpu();
    let cpu = cpu_table(&cpu);
    let fixture = c_fixture();
    let mut g = c.benchmark_group("abi_call");
    g.bench_function("device_count/cpu-rust-glue", |b| {
        b.iter(|| black_box(cpu.device_count().unwrap()))
    });
    g.bench_function("device_count/c-fixture", |b| {
        b.iter(|| black_box(fixture.device_count().unwrap()))
    });
    g.bench_function("device_count/direct-rust-peer", |b| {
        b.iter(|| {
            black_box(
                <kiln_cpu::CpuBackend as kiln_plugin_api::Backend>::device_count(black_box(
                    &DIRECT,
                )),
            )
        })
    });
    let query = [tensor(std::ptr::null_mut()), tensor(std::ptr::null_mut())];
    let op = scale_op();
    g.bench_function("supports_op/cpu-rust-glue", |b| {
        b.iter(|| black_box(cpu.supports_op(0, &op, &query).unwrap()))
    });
    g.bench_function("supports_op/c-fixture", |b| {
        b.iter(|| black_box(fixture.supports_op(0, &op, &query).unwrap()))
    });
    g.bench_function("supports_op/direct-rust-peer", |b| {
        let d = Desc::contiguous(DType::F32, [16, 1, 1, 1]);
        b.iter(|| black_box(kiln_cpu::ops::check(OpKind::Scale, &[d], &d, &op.params).is_ok()))
    });
    g.finish();
}

/// A `CpuBackend` value for the direct-call peer (device_count reads no state).
static DIRECT: std::sync::LazyLock<kiln_cpu::CpuBackend> = std::sync::LazyLock::new(|| {
    <kiln_cpu::CpuBackend as kiln_plugin_api::Backend>::new(kiln_plugin_api::HostServices::none())
        .unwrap()
});

fn round_trip(h: &Handle) -> impl FnMut() + '_ {
    let a = h.buffer_alloc(0, 64).unwrap();
    let y = h.buffer_alloc(0, 64).unwrap();
    h.buffer_write(a, 0, &[0u8; 64]).unwrap();
    let tensors = [tensor(a.0), tensor(y.0)];
    let ops = [scale_op()];
    move || {
        h.graph_compute(0, &tensors, &ops, 0).unwrap();
        h.synchronize(0).unwrap();
    }
}

fn graph_round_trips(c: &mut Criterion) {
    let cpu = Backend::builtin_cpu();
    let fixture = Handle::InProcess(c_fixture());
    let lib = kiln_tests::c_fixture("kiln_bench_fixture", &["-O2"]);
    let worker = Handle::Worker(Worker::start("c-fixture", &lib, Limits::default(), None).unwrap());
    let mut g = c.benchmark_group("graph_round_trip");
    let mut run = round_trip(cpu.handle());
    g.bench_function("scale16/cpu-rust-glue", |b| b.iter(&mut run));
    let mut run = round_trip(&fixture);
    g.bench_function("scale16/c-fixture", |b| b.iter(&mut run));
    let mut run = round_trip(&worker);
    g.bench_function("scale16/c-fixture-worker", |b| b.iter(&mut run));
    g.bench_function("scale16/direct-rust-peer", |b| {
        let mut x = vec![0u8; 64];
        let mut y = vec![0u8; 64];
        let d = Desc::contiguous(DType::F32, [16, 1, 1, 1]);
        let params = scale_op().params;
        b.iter(|| {
            let src = View {
                data: x.as_mut_ptr(),
                desc: d,
            };
            let dst = View {
                data: y.as_mut_ptr(),
                desc: d,
            };
            kiln_cpu::ops::check(OpKind::Scale, &[d], &d, &params).unwrap();
            // SAFETY: both views cover their 64-byte vectors.
            unsafe { kiln_cpu::ops::run(OpKind::Scale, &[src], &dst, &params) }.unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, abi_calls, graph_round_trips);
criterion_main!(benches);
