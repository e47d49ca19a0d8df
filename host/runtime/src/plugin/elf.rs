//! A sanity check of a shared library's bytes before the dynamic loader
//! sees them. The loader maps segments straight from the file: a truncated
//! library whose segments reach past the end of the file would fault (SIGBUS)
//! on first touch instead of failing cleanly, so we check that every piece
//! the loader will read lies inside the file, and that the file is a shared
//! object for this machine.

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const ET_DYN: u16 = 3;

#[cfg(target_arch = "x86_64")]
const HOST_MACHINE: Option<(u16, &str)> = Some((62, "x86-64"));
#[cfg(target_arch = "aarch64")]
const HOST_MACHINE: Option<(u16, &str)> = Some((183, "aarch64"));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const HOST_MACHINE: Option<(u16, &str)> = None;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn machine_name(m: u16) -> String {
    match m {
        3 => "x86 (32-bit)".into(),
        40 => "arm (32-bit)".into(),
        62 => "x86-64".into(),
        183 => "aarch64".into(),
        243 => "risc-v".into(),
        other => format!("machine {other}"),
    }
}

/// Checks a library's bytes; the error says what is wrong, in words.
pub fn check_library(bytes: &[u8]) -> Result<(), String> {
    if cfg!(any(target_os = "macos", target_os = "windows")) {
        // Mach-O and PE checks are not written yet; the loader's own
        // checks apply there.
        return Ok(());
    }
    check_elf(bytes)
}

/// Checks that `bytes` is a complete 64-bit little-endian ELF shared object
/// for this machine.
pub fn check_elf(bytes: &[u8]) -> Result<(), String> {
    let len = bytes.len() as u64;
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(
            "not an ELF file (wrong magic bytes); is it a shared library for Linux?".into(),
        );
    }
    if bytes.len() < 64 {
        return Err(format!(
            "truncated ELF file: {len} bytes is shorter than the 64-byte header"
        ));
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let e_type = u16_at(bytes, 16);
    if e_type != ET_DYN {
        return Err(format!(
            "ELF type {e_type} is not a shared object (ET_DYN); build the plugin as a cdylib/-shared"
        ));
    }
    let machine = u16_at(bytes, 18);
    if let Some((want, name)) = HOST_MACHINE
        && machine != want
    {
        return Err(format!(
            "built for {}, but this machine is {name}",
            machine_name(machine)
        ));
    }
    let (phoff, shoff) = (u64_at(bytes, 32), u64_at(bytes, 40));
    let (phentsize, phnum) = (u16_at(bytes, 54) as u64, u16_at(bytes, 56) as u64);
    let (shentsize, shnum) = (u16_at(bytes, 58) as u64, u16_at(bytes, 60) as u64);
    if phnum == 0 || phentsize < 56 {
        return Err("ELF file has no program headers; it cannot be loaded".into());
    }
    let inside = |off: u64, size: u64| off.checked_add(size).is_some_and(|end| end <= len);
    if !inside(phoff, phentsize * phnum) {
        return Err(format!(
            "truncated ELF file: program headers end at byte {} but the file has {len}",
            phoff.saturating_add(phentsize * phnum)
        ));
    }
    if shnum > 0 && !inside(shoff, shentsize * shnum) {
        return Err(format!(
            "truncated ELF file: section headers end at byte {} but the file has {len}",
            shoff.saturating_add(shentsize * shnum)
        ));
    }
    for i in 0..phnum {
        let ph = (phoff + i * phentsize) as usize;
        let p_type = u32_at(bytes, ph);
        if p_type != PT_LOAD && p_type != PT_DYNAMIC {
            continue;
        }
        let (offset, filesz) = (u64_at(bytes, ph + 8), u64_at(bytes, ph + 32));
        if !inside(offset, filesz) {
            return Err(format!(
                "truncated ELF file: segment {i} needs bytes {offset}..{} but the file has {len}",
                offset.saturating_add(filesz)
            ));
        }
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn some_shared_object() -> Vec<u8> {
        // libc is a shared object on every Linux machine we build on.
        for p in [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
        ] {
            if let Ok(b) = std::fs::read(p) {
                return b;
            }
        }
        panic!("no libc.so.6 found to test against");
    }

    #[test]
    fn accepts_a_real_shared_object() {
        check_elf(&some_shared_object()).unwrap();
    }

    #[test]
    fn refuses_truncations_at_every_scale() {
        let full = some_shared_object();
        for cut in [0, 3, 40, 63, 64, 200, full.len() / 2, full.len() - 1] {
            assert!(check_elf(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn refuses_text_and_executables() {
        assert!(
            check_elf(b"#!/bin/sh\necho hi\n")
                .unwrap_err()
                .contains("not an ELF")
        );
        let mut exe = some_shared_object();
        exe[16] = 2; // ET_EXEC
        assert!(check_elf(&exe).unwrap_err().contains("not a shared object"));
    }
}
