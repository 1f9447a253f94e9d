//! Loading a guest image: a static, non-PIE x86-64 ELF64 executable whose loadable segments lie
//! between [`vmm_abi::IMAGE_MIN_ADDR`] and the stack at the top of guest memory.

use crate::memory::GuestMem;
use crate::{Error, Result};
use std::path::Path;
use vmm_abi::{IMAGE_MIN_ADDR, PAGE_SIZE, STACK_SIZE};

/// Where the image landed.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Entry point.
    pub entry: u64,
    /// First byte after the highest segment (page-aligned).
    pub end: u64,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Largest image file read: the largest guest memory (the ABI's `MAX_MEM`).
pub const IMAGE_MAX: u64 = vmm_abi::MAX_MEM;

/// Reads the image file and loads it into `mem`. Only a regular file of at most
/// [`IMAGE_MAX`] bytes is read (not a device, a FIFO or `/dev/zero`).
pub fn load_file(path: &Path, mem: &mut GuestMem) -> Result<Loaded> {
    let image_err = |reason: String| Error::Image { path: path.to_owned(), reason };
    let f = std::fs::File::open(path).map_err(crate::error::io("cannot read guest image", path))?;
    let meta = f.metadata().map_err(crate::error::io("cannot stat guest image", path))?;
    if !meta.is_file() {
        return Err(image_err("not a regular file".into()));
    }
    if meta.len() > IMAGE_MAX {
        return Err(image_err(format!("{} bytes, more than the largest guest memory ({IMAGE_MAX} bytes)", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, IMAGE_MAX + 1), &mut bytes)
        .map_err(crate::error::io("cannot read guest image", path))?;
    if bytes.len() as u64 > IMAGE_MAX {
        return Err(image_err(format!("grew beyond {IMAGE_MAX} bytes while being read")));
    }
    load(&bytes, mem).map_err(image_err)
}

/// Validates an ELF image and copies its loadable segments into `mem` (zero-filling .bss).
/// Never panics, whatever the bytes: every offset and size is computed with checked arithmetic.
pub fn load(b: &[u8], mem: &mut GuestMem) -> Result<Loaded, String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("not an ELF file (bad magic)".into());
    }
    if b[4] != 2 {
        return Err(format!("ELF class {} is not ELF64 (a 32-bit image?)", b[4]));
    }
    if b[5] != 1 {
        return Err("not little-endian".into());
    }
    let short = || "truncated ELF header".to_string();
    let e_type = u16_at(b, 16).ok_or_else(short)?;
    let machine = u16_at(b, 18).ok_or_else(short)?;
    if machine != EM_X86_64 {
        return Err(format!("machine {machine} is not x86-64 (62)"));
    }
    if e_type == ET_DYN {
        return Err("position-independent (ET_DYN) image: link guests with -static -no-pie".into());
    }
    if e_type != ET_EXEC {
        return Err(format!("ELF type {e_type} is not an executable"));
    }
    let entry = u64_at(b, 24).ok_or_else(short)?;
    let phoff = u64_at(b, 32).ok_or_else(short)?;
    let phentsize = u16_at(b, 54).ok_or_else(short)? as usize;
    let phnum = u16_at(b, 56).ok_or_else(short)? as usize;
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Err(format!("bad program header table ({phnum} entries of {phentsize} bytes)"));
    }
    let limit = mem.size().saturating_sub(STACK_SIZE);
    let mut end = 0u64;
    let mut entry_ok = false;
    for i in 0..phnum {
        let outside = || format!("program header {i} lies outside the file");
        let o = (i as u64)
            .checked_mul(phentsize as u64)
            .and_then(|x| x.checked_add(phoff))
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(outside)?;
        let ph = o.checked_add(56).and_then(|end| b.get(o..end)).ok_or_else(outside)?;
        let p_type = u32_at(ph, 0).ok_or_else(short)?;
        if p_type == PT_INTERP || p_type == PT_DYNAMIC {
            return Err("dynamically linked image: link guests with -static -no-pie".into());
        }
        if p_type != PT_LOAD {
            continue;
        }
        let flags = u32_at(ph, 4).ok_or_else(short)?;
        let offset = u64_at(ph, 8).ok_or_else(short)?;
        let vaddr = u64_at(ph, 16).ok_or_else(short)?;
        let filesz = u64_at(ph, 32).ok_or_else(short)?;
        let memsz = u64_at(ph, 40).ok_or_else(short)?;
        if filesz > memsz {
            return Err(format!("segment {i}: file size {filesz} exceeds memory size {memsz}"));
        }
        let seg_end = vaddr.checked_add(memsz).ok_or_else(|| format!("segment {i}: address overflows"))?;
        if vaddr < IMAGE_MIN_ADDR || seg_end > limit {
            return Err(format!(
                "segment {i} at 0x{vaddr:x}..0x{seg_end:x} lies outside the image area 0x{IMAGE_MIN_ADDR:x}..0x{limit:x} \
                 (guest memory {} MiB minus a {} KiB stack)",
                mem.size() >> 20,
                STACK_SIZE >> 10
            ));
        }
        let data = offset
            .checked_add(filesz)
            .and_then(|e| b.get(usize::try_from(offset).ok()?..usize::try_from(e).ok()?))
            .ok_or_else(|| format!("segment {i}: file range {offset}+{filesz} lies outside the file ({} bytes)", b.len()))?;
        mem.write(vaddr, data)?;
        let zeros = [0u8; 65536];
        // vaddr + filesz <= vaddr + memsz = seg_end, which did not overflow.
        let mut at = vaddr + filesz;
        while at < seg_end {
            let n = (seg_end - at).min(zeros.len() as u64);
            mem.write(at, &zeros[..n as usize])?;
            at += n;
        }
        if flags & 1 != 0 && (vaddr..seg_end).contains(&entry) {
            entry_ok = true;
        }
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err("no loadable segment".into());
    }
    if !entry_ok {
        return Err(format!("entry point 0x{entry:x} is not inside an executable segment"));
    }
    Ok(Loaded { entry, end: end.next_multiple_of(PAGE_SIZE) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid image: header, one executable PT_LOAD at 2 MiB with 16 bytes of code.
    fn tiny() -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 + 16];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&IMAGE_MIN_ADDR.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&IMAGE_MIN_ADDR.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&4096u64.to_le_bytes());
        b
    }

    #[test]
    fn tiny_image_loads() {
        let mut mem = GuestMem::new(8 << 20).expect("memory");
        let l = load(&tiny(), &mut mem).expect("loads");
        assert_eq!(l.entry, IMAGE_MIN_ADDR);
        assert_eq!(l.end, IMAGE_MIN_ADDR + 4096);
    }

    /// Mutated and truncated images never panic the loader.
    #[test]
    fn mutated_images_never_panic() {
        let good = tiny();
        let mut mem = GuestMem::new(8 << 20).expect("memory");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut refused = 0;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                b[i] = if next() % 2 == 0 { next() as u8 } else { 0xff };
            }
            if next() % 10 == 0 {
                b.truncate((next() % b.len() as u64) as usize);
            }
            if load(&b, &mut mem).is_err() {
                refused += 1;
            }
        }
        assert!(refused > 1000);
    }

    /// The overflow the hostile-file tests found: a program header offset near `u64::MAX`.
    #[test]
    fn program_header_offset_near_the_top_is_refused() {
        let mut mem = GuestMem::new(8 << 20).expect("memory");
        for phoff in [u64::MAX, u64::MAX - 55, u64::MAX - 56 * 63, (usize::MAX - 10) as u64] {
            let mut b = tiny();
            b[32..40].copy_from_slice(&phoff.to_le_bytes());
            let e = load(&b, &mut mem).expect_err("refused");
            assert!(e.contains("outside the file"), "{e}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Any bytes: refused with a reason or loaded inside the image area, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut mem = GuestMem::new(8 << 20).expect("memory");
            if let Ok(l) = load(&bytes, &mut mem) {
                prop_assert!(l.end <= mem.size());
            }
        }

        /// The valid image with fields overwritten by arbitrary values (header and program
        /// header words): refused with a reason or loaded inside the image area.
        #[test]
        fn fields_overwritten_never_panic(at in 0usize..136, width in prop_oneof![Just(1usize), Just(2), Just(4), Just(8)], value in any::<u64>()) {
            let mut b = tiny();
            let end = (at + width).min(b.len());
            b[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            let mut mem = GuestMem::new(8 << 20).expect("memory");
            match load(&b, &mut mem) {
                Ok(l) => prop_assert!(l.entry >= IMAGE_MIN_ADDR && l.end <= mem.size() - STACK_SIZE),
                Err(reason) => prop_assert!(!reason.is_empty()),
            }
        }
    }
}
