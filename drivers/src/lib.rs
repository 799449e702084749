//! blockhaus's drivers: the hardware side of the appliance.
//!
//! Port I/O and MMIO live here and nowhere in `block/`. Each module owns one
//! device or table: [`uart`] (COM1 console, COM2 QMP), [`acpi`] (RSDP → FADT
//! → S5 poweroff), [`time`] (TSC calibrated against the PIT, CMOS RTC),
//! [`lapic`] (the local APIC timer that wakes an idle CPU), [`pic`] (masking
//! the legacy 8259s), [`net`] (virtio-net as a smoltcp device). The pure
//! parts (table parsing, time arithmetic, neighbour learning) are tested on
//! the host.
#![cfg_attr(not(any(test, feature = "fake")), no_std)]

extern crate alloc;

pub mod acpi;
pub mod ioapic;
pub mod lapic;
pub mod net;
pub mod pci;
pub mod pic;
pub mod port;
pub mod time;
pub mod uart;
pub mod virtio;
