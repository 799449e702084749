//! GDT with a TSS (a separate stack for double faults, so a stack overflow
//! is reported instead of triple-faulting), and the IDT: every exception
//! prints its vector, error code, RIP and CR2 on COM1 and takes the failure
//! exit. Every other interrupt only ends `hlt`: the LAPIC one-shot timer
//! (armed for the next deadline, [`wait_until`]), the virtio devices' MSI-X
//! messages (INTx for a device without MSI-X) and COM2's receive interrupt
//! (through the I/O APIC). Their
//! stubs count the interrupt, signal EOI and return; the main loop then
//! polls everything. Interrupts are enabled only inside [`wait_until`]'s
//! `sti; hlt`, so a handler never interrupts the appliance's work.
//!
//! Entry stubs are naked functions (stable Rust has no `x86-interrupt` ABI).

use core::arch::naked_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use x86_64::VirtAddr;
use x86_64::instructions::tables::lidt;
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::structures::DescriptorTablePointer;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;

pub const TIMER_VECTOR: u8 = 0x20;
/// The disks' MSI-X entries (virtio-blk, virtio-scsi).
pub const DISK_VECTOR: u8 = 0x30;
/// The network device's MSI-X entries.
pub const NET_VECTOR: u8 = 0x31;
/// The virtio-serial device's MSI-X entries (QMP ports).
pub const CONSOLE_VECTOR: u8 = 0x32;
/// COM2's receive interrupt (ISA IRQ 3 through the I/O APIC).
pub const UART_VECTOR: u8 = 0x33;
/// COM2's ISA IRQ, which is GSI 3 on every QEMU x86 machine.
pub const COM2_GSI: u8 = 3;
/// The ACPI power button's interrupt (SCI or GED), through the I/O APIC.
pub const SCI_VECTOR: u8 = 0x34;
/// The INTx lines of virtio functions without MSI-X, through the I/O APIC.
pub const INTX_VECTOR: u8 = 0x35;

/// Interrupts taken since boot, per source, and halts (`hlt` entered).
static TIMER_IRQS: AtomicU64 = AtomicU64::new(0);
static DISK_IRQS: AtomicU64 = AtomicU64::new(0);
static NET_IRQS: AtomicU64 = AtomicU64::new(0);
static CONSOLE_IRQS: AtomicU64 = AtomicU64::new(0);
static UART_IRQS: AtomicU64 = AtomicU64::new(0);
static SCI_IRQS: AtomicU64 = AtomicU64::new(0);
static INTX_IRQS: AtomicU64 = AtomicU64::new(0);
/// `INTX_IRQS` when [`ack_intx`] last read the ISRs.
static INTX_SEEN: AtomicU64 = AtomicU64::new(0);
/// The ISR status bytes of the functions on INTx ([`route_intx`]), 0 for
/// a free slot.
static INTX_ISRS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
/// `SCI_IRQS` when [`take_sci`] last looked.
static SCI_SEEN: AtomicU64 = AtomicU64::new(0);
static HALTS: AtomicU64 = AtomicU64::new(0);
/// Some device cannot wake the CPU: the idle loop polls at [`POLL_NS`].
static POLLED: AtomicBool = AtomicBool::new(false);
/// How often a device without interrupts is polled while idle (the old
/// 100 Hz tick).
pub const POLL_NS: u64 = 10_000_000;
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
        idt.0[DISK_VECTOR as usize] = gate(disk_stub as *const () as u64, code.0, 0);
        idt.0[NET_VECTOR as usize] = gate(net_stub as *const () as u64, code.0, 0);
        idt.0[CONSOLE_VECTOR as usize] = gate(console_stub as *const () as u64, code.0, 0);
        idt.0[UART_VECTOR as usize] = gate(uart_stub as *const () as u64, code.0, 0);
        idt.0[SCI_VECTOR as usize] = gate(sci_stub as *const () as u64, code.0, 0);
        idt.0[INTX_VECTOR as usize] = gate(intx_stub as *const () as u64, code.0, 0);
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

/// A wake-up interrupt: count it in `$counter`, signal EOI, return. Its
/// only job is to end `hlt`.
macro_rules! wake_stub {
    ($name:ident, $counter:ident) => {
        #[unsafe(naked)]
        extern "C" fn $name() {
            naked_asm!(
                "lock inc qword ptr [rip + {count}]",
                "push rax",
                "mov rax, {eoi}",
                "mov dword ptr [rax], 0",
                "pop rax",
                "iretq",
                count = sym $counter,
                eoi = const drivers::lapic::BASE + 0xB0,
            )
        }
    };
}

wake_stub!(timer_stub, TIMER_IRQS);
wake_stub!(disk_stub, DISK_IRQS);
wake_stub!(net_stub, NET_IRQS);
wake_stub!(console_stub, CONSOLE_IRQS);
wake_stub!(uart_stub, UART_IRQS);
wake_stub!(sci_stub, SCI_IRQS);
wake_stub!(intx_stub, INTX_IRQS);

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

/// Arms the LAPIC one-shot timer for `deadline_ns` (monotonic; `None`:
/// no deadline, only an interrupt wakes), then enables interrupts and
/// halts until the next interrupt (`sti; hlt`: one arriving in between is
/// taken at the `hlt`). Returns at once if the deadline has passed.
pub fn wait_until(deadline_ns: Option<u64>) {
    if let Some(deadline) = deadline_ns {
        let now = crate::clock::monotonic_ns();
        if deadline <= now {
            return;
        }
        let ticks =
            u128::from(deadline - now) * u128::from(crate::clock::lapic_timer_hz()) / 1_000_000_000;
        drivers::lapic::arm_oneshot(TIMER_VECTOR, ticks.clamp(1, u128::from(u32::MAX)) as u32);
    }
    HALTS.fetch_add(1, Ordering::Relaxed);
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
    // Woken early: the timer must not fire while the appliance works
    // (interrupts off, it would only end the next `hlt` for nothing).
    drivers::lapic::disarm();
}

/// Interrupts taken and halts entered since boot.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub halts: u64,
    pub timer: u64,
    pub disk: u64,
    pub net: u64,
    pub console: u64,
    pub uart: u64,
    pub sci: u64,
    pub intx: u64,
}

pub fn counts() -> Counts {
    Counts {
        halts: HALTS.load(Ordering::Relaxed),
        timer: TIMER_IRQS.load(Ordering::Relaxed),
        disk: DISK_IRQS.load(Ordering::Relaxed),
        net: NET_IRQS.load(Ordering::Relaxed),
        console: CONSOLE_IRQS.load(Ordering::Relaxed),
        uart: UART_IRQS.load(Ordering::Relaxed),
        sci: SCI_IRQS.load(Ordering::Relaxed),
        intx: INTX_IRQS.load(Ordering::Relaxed),
    }
}

/// `what` cannot interrupt: from now on the idle loop wakes every
/// [`POLL_NS`] to poll it.
pub fn poll_without_interrupt(what: core::fmt::Arguments<'_>) {
    log::warn!(
        "{what}: no interrupt, polled every {} ms while idle",
        POLL_NS / 1_000_000
    );
    POLLED.store(true, Ordering::Relaxed);
}

/// Whether some device is polled on a timer ([`poll_without_interrupt`]).
pub fn polled() -> bool {
    POLLED.load(Ordering::Relaxed)
}

/// Registers `x-blockhaus-interrupts` (with `blockhaus.debug-commands=on`):
/// the counts of halts and of interrupts per source since boot, so a test
/// can count how often an idle appliance wakes.
pub fn register_debug(commands: &mut block::qmp::Dispatcher<crate::app::Appliance>) {
    commands.register(
        "x-blockhaus-interrupts",
        block::qmp::Signature::new(
            "",
            "{halts:uint64, timer:uint64, disk:uint64, net:uint64, console:uint64, uart:uint64, sci:uint64, intx:uint64, polled:bool}",
        ),
        |_, args| {
            args.check_known(&[])?;
            let c = counts();
            Ok(serde_json::json!({
                "halts": c.halts,
                "timer": c.timer,
                "disk": c.disk,
                "net": c.net,
                "console": c.console,
                "uart": c.uart,
                "sci": c.sci,
                "intx": c.intx,
                "polled": polled(),
            }))
        },
    );
}

/// Routes the power button's interrupt through the I/O APIC; false if
/// there is no button or no I/O APIC (the caller then polls the button).
///
/// The pin is programmed edge-triggered although PM1's SCI is a level
/// line (QEMU's MADT says so): the handler only signals EOI, and a level
/// line still asserted at EOI would be delivered again at once, forever,
/// before the main loop could clear it. Edge-triggered, each press (a
/// rising edge) is one interrupt, and the main loop then reads and clears
/// the button's status ([`take_sci`]).
pub fn route_power_button() -> bool {
    let Some(gsi) = crate::halt::power_button_gsi() else {
        return false;
    };
    // SAFETY: only this module programs the I/O APIC, at boot; the IDT
    // has `SCI_VECTOR`.
    unsafe { drivers::ioapic::route_edge(gsi, SCI_VECTOR, drivers::lapic::id()) }
}

/// Routes the INTx line of a virtio function without MSI-X (ISA IRQ
/// `line`) to [`INTX_VECTOR`], the function's ISR status byte at `isr`
/// to be read by [`ack_intx`]; false if there is no I/O APIC, no slot
/// left, or the pin is COM2's or the power button's (the caller then
/// polls the function on a timer).
///
/// The pin is programmed edge-triggered, as the power button's: a level
/// line still asserted at EOI would be delivered again at once, before
/// the main loop could lower it. Each rising edge wakes the CPU; the main
/// loop then reads the ISRs, which lowers the line so the next
/// notification is an edge again.
///
/// # Safety
/// `isr` is the identity-mapped ISR status byte of a virtio function
/// (reading it only acknowledges the function's interrupt).
pub unsafe fn route_intx(line: u8, isr: u64) -> bool {
    // A pin the power button or COM2 already uses keeps its route (their
    // stubs only count their own interrupt).
    if line == COM2_GSI || crate::halt::power_button_gsi() == Some(line) {
        return false;
    }
    let Some(slot) = INTX_ISRS.iter().find(|s| s.load(Ordering::Relaxed) == 0) else {
        return false;
    };
    // SAFETY: only this module programs the I/O APIC, at boot; the IDT
    // has `INTX_VECTOR`.
    if !unsafe { drivers::ioapic::route_edge(line, INTX_VECTOR, drivers::lapic::id()) } {
        return false;
    }
    slot.store(isr, Ordering::Relaxed);
    // A line already high gives no edge: lower it now.
    read_isrs();
    true
}

/// After an INTx interrupt: reads every INTx function's ISR (lowering its
/// line) until a whole pass finds none pending, so that the shared line
/// is low and the next notification is a new edge. Call before polling
/// the devices: what the ISRs acknowledged is then in their used rings.
pub fn ack_intx() {
    let now = INTX_IRQS.load(Ordering::Relaxed);
    if INTX_SEEN.swap(now, Ordering::Relaxed) != now {
        read_isrs();
    }
}

fn read_isrs() {
    for _ in 0..8 {
        let mut pending = false;
        for slot in &INTX_ISRS {
            let isr = slot.load(Ordering::Relaxed);
            if isr != 0 {
                // SAFETY: `route_intx`'s caller gave an identity-mapped
                // ISR status byte; reading it acknowledges the interrupt.
                pending |= unsafe { core::ptr::read_volatile(isr as *const u8) } != 0;
            }
        }
        if !pending {
            break;
        }
    }
}

/// Whether the power button's interrupt arrived since the last call.
pub fn take_sci() -> bool {
    let now = SCI_IRQS.load(Ordering::Relaxed);
    SCI_SEEN.swap(now, Ordering::Relaxed) != now
}

/// Routes COM2's receive interrupt through the I/O APIC; false if there is
/// no I/O APIC (the caller then polls COM2 on a timer).
pub fn route_com2() -> bool {
    // SAFETY: only this function programs the I/O APIC, at boot; the IDT
    // has `UART_VECTOR`.
    unsafe { drivers::ioapic::route_edge(COM2_GSI, UART_VECTOR, drivers::lapic::id()) }
}
