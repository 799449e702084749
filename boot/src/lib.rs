//! blockhaus's boot path: the PVH entry (`pvh.s`), the page tables and the
//! [`BootInfo`] handed to the kernel.
//!
//! QEMU's `-kernel` (pc, q35, microvm), Cloud Hypervisor and Firecracker start
//! the image through the PVH ELF note; `pvh.s` switches to long mode with the
//! first 4 GiB identity-mapped and calls [`pvh_rust_entry`], which copies the
//! `hvm_start_info` data out of low memory ([`pvh`]), maps RAM above 4 GiB
//! and unmaps the stack guard page ([`paging`]), then calls the kernel's
//! `kernel_main(&'static BootInfo)`.
#![no_std]

pub mod info;
pub mod paging;
pub mod pvh;

pub use info::{BootInfo, MemoryRegion, MemoryType};

core::arch::global_asm!(include_str!("pvh.s"), options(att_syntax));

unsafe extern "Rust" {
    /// The kernel's entry point, defined by the binary crate.
    fn kernel_main(info: &'static BootInfo) -> !;
}

/// Called from `pvh.s` in long mode, on the boot stack, with `.bss` zeroed.
///
/// # Safety
/// Only `pvh.s` calls this, once, with the physical address QEMU put in
/// `%ebx` (identity-mapped).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pvh_rust_entry(start_info: u32) -> ! {
    // SAFETY: single-threaded boot; nothing else references BOOT_INFO yet.
    let info: &'static mut BootInfo = unsafe { &mut *core::ptr::addr_of_mut!(BOOT_INFO) };
    // SAFETY: `start_info` is the address QEMU handed us in %ebx; the first
    // 4 GiB are identity-mapped, and the structure has not been reused.
    unsafe { pvh::read_start_info(start_info as u64, info) };
    // SAFETY: the page tables built by pvh.s are live and ours alone.
    unsafe { paging::finish(info) };
    // SAFETY: defined by the kernel binary with this exact signature.
    unsafe { kernel_main(info) }
}

static mut BOOT_INFO: BootInfo = BootInfo::empty();
