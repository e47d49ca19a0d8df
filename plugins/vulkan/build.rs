//! Compiles `shaders/*.comp` to SPIR-V with `glslc` (Debian: `apt-get
//! install glslc`; the Vulkan SDK elsewhere) into `OUT_DIR`, where the
//! library embeds them. No network, no prebuilt blobs.

use std::path::Path;
use std::process::Command;

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let glslc = std::env::var("GLSLC").unwrap_or_else(|_| "glslc".into());
    println!("cargo:rerun-if-env-changed=GLSLC");
    println!("cargo:rerun-if-changed=shaders");
    let mut shaders: Vec<_> = std::fs::read_dir("shaders")
        .expect("shaders/ next to build.rs")
        .map(|e| e.expect("readable shaders/").path())
        .collect();
    shaders.sort();
    for src in shaders {
        println!("cargo:rerun-if-changed={}", src.display());
        if src.extension().and_then(|e| e.to_str()) != Some("comp") {
            continue;
        }
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let spv = Path::new(&out).join(format!("{stem}.spv"));
        let result = Command::new(&glslc)
            .args(["-O", "--target-env=vulkan1.1", "-Werror", "-o"])
            .arg(&spv)
            .arg(&src)
            .output();
        match result {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "glslc failed on {}:\n{}",
                src.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!(
                "cannot run `{glslc}` ({e}): the Vulkan plugin compiles its shaders at build \
                 time; install glslc (Debian: apt-get install glslc) or set GLSLC"
            ),
        }
    }
}
