//! GDT with a TSS (a separate stack for double faults, so a stack overflow
//! is reported instead of triple-faulting), and the IDT: every exception
//! prints its vector, error code, RIP and CR2 on COM1 and takes the failure
//! exit; the LAPIC timer only wakes the CPU from `hlt`.
//!
//! Entry stubs are naked functions (stable Rust has no `x86-interrupt` ABI).

use core::arch::naked_asm;
use x86_64::VirtAddr;
use x86_64::instructions::tables::lidt;
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::structures::DescriptorTablePointer;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;

pub const TIMER_VECTOR: u8 = 0x20;
const DOUBLE_FAULT_IST: u16 = 0;

#[repr(C, align(16))]
struct Stack([u8; 64 * 1024]);
static mut DOUBLE_FAULT_STACK: Stack = Stack([0; 64 * 1024]);

static mut TSS: TaskStateSegment = TaskStateSegment::new();
static mut GDT: GlobalDescriptorTable = GlobalDescriptorTable::new();
static mut IDT: Idt = Idt([[0; 2]; 256]);

/// Register state saved by the common exception stub, lowest address first.
#[repr(C)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Loads the GDT/TSS and the IDT.
pub fn init() {
    // SAFETY: boot is single-threaded and interrupts are off; the statics
    // are only touched here, and live for the rest of the run.
    unsafe {
        let tss = &mut *core::ptr::addr_of_mut!(TSS);
        let stack = core::ptr::addr_of!(DOUBLE_FAULT_STACK) as u64;
        tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] = VirtAddr::new(stack + 64 * 1024);
        let gdt = &mut *core::ptr::addr_of_mut!(GDT);
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(&*core::ptr::addr_of!(TSS)));
        (*core::ptr::addr_of!(GDT)).load();
        CS::set_reg(code);
        DS::set_reg(data);
        ES::set_reg(data);
        SS::set_reg(data);
        load_tss(tss_sel);

        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (vector, stub) in EXCEPTION_STUBS.iter().enumerate() {
            let ist = if vector == 8 { DOUBLE_FAULT_IST + 1 } else { 0 };
            idt.0[vector] = gate(*stub as *const () as u64, code.0, ist);
        }
        idt.0[TIMER_VECTOR as usize] = gate(timer_stub as *const () as u64, code.0, 0);
        idt.0[drivers::lapic::SPURIOUS_VECTOR as usize] =
            gate(spurious_stub as *const () as u64, code.0, 0);
        lidt(&DescriptorTablePointer {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: VirtAddr::new(idt as *const Idt as u64),
        });
    }
}

/// The interrupt descriptor table: 256 16-byte gates.
#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

/// A present, ring-0, 64-bit interrupt gate (interrupts stay disabled in
/// the handler). `ist` is 1-based; 0 means the current stack.
fn gate(handler: u64, selector: u16, ist: u16) -> [u64; 2] {
    let low = (handler & 0xffff)
        | ((selector as u64) << 16)
        | (((ist & 0x7) as u64) << 32)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

macro_rules! stub {
    ($name:ident, $vector:literal) => {
        #[unsafe(naked)]
        extern "C" fn $name() {
            naked_asm!("push 0", "push {v}", "jmp {common}", v = const $vector, common = sym exception_common)
        }
    };
    ($name:ident, $vector:literal, error_code) => {
        #[unsafe(naked)]
        extern "C" fn $name() {
            naked_asm!("push {v}", "jmp {common}", v = const $vector, common = sym exception_common)
        }
    };
}

stub!(ex0, 0);
stub!(ex1, 1);
stub!(ex2, 2);
stub!(ex3, 3);
stub!(ex4, 4);
stub!(ex5, 5);
stub!(ex6, 6);
stub!(ex7, 7);
stub!(ex8, 8, error_code);
stub!(ex9, 9);
stub!(ex10, 10, error_code);
stub!(ex11, 11, error_code);
stub!(ex12, 12, error_code);
stub!(ex13, 13, error_code);
stub!(ex14, 14, error_code);
stub!(ex15, 15);
stub!(ex16, 16);
stub!(ex17, 17, error_code);
stub!(ex18, 18);
stub!(ex19, 19);
stub!(ex20, 20);
stub!(ex21, 21, error_code);
stub!(ex22, 22);
stub!(ex23, 23);
stub!(ex24, 24);
stub!(ex25, 25);
stub!(ex26, 26);
stub!(ex27, 27);
stub!(ex28, 28);
stub!(ex29, 29, error_code);
stub!(ex30, 30, error_code);
stub!(ex31, 31);

static EXCEPTION_STUBS: [extern "C" fn(); 32] = [
    ex0, ex1, ex2, ex3, ex4, ex5, ex6, ex7, ex8, ex9, ex10, ex11, ex12, ex13, ex14, ex15, ex16,
    ex17, ex18, ex19, ex20, ex21, ex22, ex23, ex24, ex25, ex26, ex27, ex28, ex29, ex30, ex31,
];

/// Saves the general registers and calls [`exception_handler`] with a
/// pointer to the [`ExceptionFrame`]. Never returns: every exception is
/// fatal in blockhaus.
#[unsafe(naked)]
extern "C" fn exception_common() {
    naked_asm!(
        "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
        "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
        "mov rdi, rsp",
        "cld",
        "call {handler}",
        "ud2",
        handler = sym exception_handler,
    )
}

/// The LAPIC timer: acknowledge and return; its only job is to end `hlt`.
#[unsafe(naked)]
extern "C" fn timer_stub() {
    naked_asm!(
        "push rax",
        "mov rax, {eoi}",
        "mov dword ptr [rax], 0",
        "pop rax",
        "iretq",
        eoi = const drivers::lapic::BASE + 0xB0,
    )
}

/// Spurious LAPIC interrupts need no EOI.
#[unsafe(naked)]
extern "C" fn spurious_stub() {
    naked_asm!("iretq")
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack-segment fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 floating point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating point",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved",
];

extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let name = NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("unknown");
    crate::console::emergency(format_args!(
        "\nEXCEPTION: vector {} ({}) error code {:#x}\n  rip {:#018x}  cr2 {:#018x}  rsp {:#018x}  rflags {:#x}\n  \
         rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}\n",
        frame.vector,
        name,
        frame.error_code,
        frame.rip,
        cr2,
        frame.rsp,
        frame.rflags,
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
    ));
    let guard = boot::paging::stack_guard();
    let overflow =
        (frame.vector == 14 || frame.vector == 8) && (guard..guard + 4096).contains(&cr2);
    if overflow {
        crate::console::emergency(format_args!(
            "  the boot stack overflowed into its guard page at {guard:#x}\n"
        ));
    }
    // A double fault runs on its own small stack and a machine check
    // means broken hardware: neither runs the halt sequence.
    let attempt = !overflow && !matches!(frame.vector, 8 | 18);
    crate::fatal::stop("CPU exception", attempt)
}

/// Enables interrupts and waits for the next one (timer or device).
pub fn wait_for_interrupt() {
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
}
