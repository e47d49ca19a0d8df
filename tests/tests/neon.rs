//! The NEON kernels (`plugins/cpu/src/kernels/neon.rs`) built for aarch64
//! and their tests run under qemu, on an emulated CPU with the dot-product
//! extension and on one without. The toolchain kiln builds with here has
//! no aarch64 standard library, so this uses Debian's: `rustc` with
//! `libstd-rust-dev:arm64`, `gcc-aarch64-linux-gnu` to link and
//! `qemu-user` to run. Without them the test is skipped, unless
//! `KILN_REQUIRE_NEON` is set (CI sets it and installs them).

use std::path::Path;
use std::process::Command;

const TARGET: &str = "aarch64-unknown-linux-gnu";

fn tools_present() -> bool {
    let std_lib = Path::new("/usr/lib/rustlib").join(TARGET);
    let found = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    Path::new("/usr/bin/rustc").exists()
        && std_lib.exists()
        && found("aarch64-linux-gnu-gcc")
        && found("qemu-aarch64")
}

#[test]
fn neon_kernels_build_for_aarch64_and_pass_their_tests_under_qemu() {
    if !tools_present() {
        assert!(
            std::env::var_os("KILN_REQUIRE_NEON").is_none(),
            "KILN_REQUIRE_NEON is set but the aarch64 tools are missing \
             (dpkg --add-architecture arm64; apt-get install libstd-rust-dev:arm64 \
             gcc-aarch64-linux-gnu qemu-user)"
        );
        eprintln!("skipped: no aarch64 rustc std, cross linker or qemu-aarch64");
        return;
    }
    let src = kiln_tests::repo_root().join("plugins/cpu/src/kernels/neon.rs");
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("neon-tests");
    let build = Command::new("/usr/bin/rustc")
        .args(["--edition", "2021", "--test", "-O", "--target", TARGET])
        .args(["-C", "linker=aarch64-linux-gnu-gcc", "-D", "warnings"])
        // As the workspace's lints, which this build does not read.
        .args(["-D", "unsafe_op_in_unsafe_fn"])
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("run rustc");
    assert!(
        build.status.success(),
        "neon.rs does not build for aarch64:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    // On an emulated CPU with the dot-product extension (qemu's `max`: the
    // block sums by `sdot` and by baseline NEON) and on a Cortex-A53
    // without it (baseline alone, chosen at run time).
    for (cpu, dotprod) in [("max", "1"), ("cortex-a53", "0")] {
        // One test thread: qemu-user's emulation of the harness's threads
        // can hang.
        let run = Command::new("qemu-aarch64")
            .args(["-cpu", cpu, "-L", "/usr/aarch64-linux-gnu"])
            .env("KILN_EXPECT_DOTPROD", dotprod)
            .arg(&bin)
            .arg("--test-threads=1")
            .output()
            .expect("run qemu-aarch64");
        let out = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "the NEON tests failed under qemu (-cpu {cpu}):\n{out}\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            out.contains("test result: ok.") && !out.contains("ok. 0 passed"),
            "expected the NEON tests to run (-cpu {cpu}):\n{out}"
        );
    }
}
