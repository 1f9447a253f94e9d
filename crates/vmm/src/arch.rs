//! x86-64 machine setup: identity-mapped page tables with the user bit, a GDT with 64-bit user
//! segments and a TSS, and the initial registers that start the vCPU at the image's entry in
//! user mode (CPL 3) with IOPL 3, so that port I/O reaches the VMM without a guest kernel.

use crate::memory::GuestMem;
use crate::{error::kvm, Error, Result};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vmm_abi::{GDT_ADDR, PAGE_TABLES_END, PML4_ADDR};

const PRESENT_RW_USER: u64 = 0x7;
const HUGE: u64 = 0x80;
const PDPT_ADDR: u64 = PML4_ADDR + 0x1000;
const PT0_ADDR: u64 = PML4_ADDR + 0x2000;
const PD_ADDR: u64 = PML4_ADDR + 0x3000;
const TSS_ADDR: u64 = GDT_ADDR + 0x100;
/// The TSS's I/O permission bitmap follows the 0x68-byte TSS: 257 zero bytes allow ports
/// 0–2055 (the ABI's 0–2047, and the bytes 2048–2050 that a 4-byte access at 2045–2047 also
/// touches, so that such an access reaches the VMM, which reports "no device", instead of
/// faulting); the limit covers the bitmap and a terminating 0xff byte.
const TSS_IOMAP_OFFSET: u64 = 0x68;
const TSS_IOMAP_BYTES: u64 = 257;
const TSS_LIMIT: u64 = TSS_IOMAP_OFFSET + TSS_IOMAP_BYTES;

/// Selectors: user data (RPL 3), user 64-bit code (RPL 3), TSS.
pub(crate) const USER_DS: u16 = 0x18 | 3;
pub(crate) const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

/// Writes page tables identity-mapping all of guest memory with the user bit set: 4 KiB pages
/// for the first 2 MiB (page 0 is left unmapped to catch null pointers), 2 MiB pages above.
pub fn write_page_tables(mem: &mut GuestMem) -> Result<()> {
    let gib = mem.size().div_ceil(1 << 30);
    if PD_ADDR + gib * 0x1000 > PAGE_TABLES_END {
        return Err(Error::Config(format!("{} MiB of memory needs more page directories than the layout has", mem.size() >> 20)));
    }
    let put = |mem: &mut GuestMem, addr: u64, v: u64| mem.write(addr, &v.to_le_bytes()).map_err(Error::Memory);
    put(mem, PML4_ADDR, PDPT_ADDR | PRESENT_RW_USER)?;
    for g in 0..gib {
        put(mem, PDPT_ADDR + g * 8, (PD_ADDR + g * 0x1000) | PRESENT_RW_USER)?;
    }
    let huge_pages = mem.size().div_ceil(2 << 20);
    for i in 0..huge_pages {
        let entry = if i == 0 { PT0_ADDR | PRESENT_RW_USER } else { (i << 21) | PRESENT_RW_USER | HUGE };
        put(mem, PD_ADDR + i * 8, entry)?;
    }
    for p in 1..512u64 {
        put(mem, PT0_ADDR + p * 8, (p << 12) | PRESENT_RW_USER)?;
    }
    Ok(())
}

/// Writes the GDT (null, kernel code/data, user data, user 64-bit code, TSS) and a zeroed TSS.
pub fn write_gdt(mem: &mut GuestMem) -> Result<()> {
    let tss_lo = TSS_LIMIT | ((TSS_ADDR & 0xff_ffff) << 16) | (0x8b << 40) | (((TSS_ADDR >> 24) & 0xff) << 56);
    let tss_hi = TSS_ADDR >> 32;
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff, // kernel code, 64-bit
        0x00cf_9300_0000_ffff, // kernel data
        0x00cf_f300_0000_ffff, // user data, DPL 3
        0x00af_fb00_0000_ffff, // user code, 64-bit, DPL 3
        tss_lo,
        tss_hi,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write(GDT_ADDR + i as u64 * 8, &d.to_le_bytes()).map_err(Error::Memory)?;
    }
    mem.write(TSS_ADDR + 0x66, &(TSS_IOMAP_OFFSET as u16).to_le_bytes()).map_err(Error::Memory)?;
    mem.write(TSS_ADDR + TSS_LIMIT, &[0xff]).map_err(Error::Memory)?;
    Ok(())
}

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the special registers for 64-bit user mode on the tables written above.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<()> {
    let mut s: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    s.cs = segment(USER_CS, 0xb, true);
    let data = segment(USER_DS, 0x3, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT as u32,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.ldt = kvm_segment { selector: 0, type_: 2, present: 1, unusable: 1, ..Default::default() };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    // PE, MP, ET, NE, WP, PG.
    s.cr0 = 0x8005_0033;
    // PAE, OSFXSR, OSXMMEXCPT (SSE enabled).
    s.cr4 = 0x20 | 0x200 | 0x400;
    s.cr3 = PML4_ADDR;
    // LME, LMA.
    s.efer = 0x500;
    vcpu.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))
}

/// Sets the general registers: entry point, stack (rsp ≡ 8 mod 16, as after a call), the boot
/// page address in rdi, and RFLAGS with IOPL 3. Measured on this project's PVM hosts: PVM drops
/// IOPL (the guest sees RFLAGS.IOPL = 0), and port I/O from user mode reaches the VMM only
/// because the TSS's I/O permission bitmap allows it (see `write_gdt`); IOPL 3 is kept for
/// hardware KVM.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, stack_top: u64) -> Result<()> {
    let regs = kvm_regs { rip: entry, rsp: stack_top - 8, rdi: vmm_abi::BOOT_INFO_ADDR, rflags: 0x3002, ..Default::default() };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}
