//! PCI at boot: configuration space is found and every bus scanned once
//! ([`Pci::scan`], from `kernel_main`); the disks and the network take
//! their virtio functions from the result ([`Pci::virtio`]) and bring each
//! up with [`Pci::open_virtio`]. Nothing touches configuration space after
//! boot: the scan result is dropped once the devices are up. Once a
//! driver has set its queues up, [`Pci::interrupts`] gives them MSI-X
//! vectors, so the device wakes the idle CPU.

use alloc::vec::Vec;
use core::fmt;
use drivers::pci::{self, Bar, Function};
use drivers::virtio::transport::PciTransport;
use log::info;

/// virtio's PCI vendor.
const VIRTIO_VENDOR: u16 = 0x1af4;

/// Configuration space and every function found on it.
pub struct Pci {
    bus: pci::Bus,
    functions: Vec<Function>,
    /// End of the identity map: a device's memory BARs must lie below it.
    mapped: u64,
    /// Functions opened ([`Pci::open_virtio`]) whose driver has not asked
    /// for interrupts ([`Pci::interrupts`]) yet: when the scan is dropped,
    /// those left are polled on a timer, so a driver that never asks is
    /// slow to wake rather than never woken.
    unrouted: Vec<drivers::pci::Address>,
}

impl Drop for Pci {
    fn drop(&mut self) {
        for address in &self.unrouted {
            crate::interrupts::poll_without_interrupt(format_args!(
                "{address} (opened, but no interrupt asked for)"
            ));
        }
    }
}

/// Why a virtio function could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// A memory BAR the driver would use is not mapped.
    AboveIdentityMap {
        bar: Bar,
        mapped: u64,
    },
    Transport(drivers::virtio::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::AboveIdentityMap { bar, mapped } => {
                write!(f, "{bar} lies above the identity map ({mapped:#x})")
            }
            OpenError::Transport(e) => write!(f, "{e}"),
        }
    }
}

impl Pci {
    /// Finds configuration space (ECAM or port I/O), scans every bus and
    /// logs what it found.
    pub fn scan() -> Self {
        let mapped = boot::paging::mapped_end();
        // SAFETY: boot is single-threaded and only this module touches PCI
        // configuration space (the drivers it opens use their BARs, not
        // configuration space); ACPI tables are identity-mapped memory.
        let mut bus = unsafe {
            pci::Bus::new(pci::Cam::detect(
                &drivers::acpi::IdentityMapped,
                None,
                mapped,
            ))
        };
        let functions = bus.scan();
        info!("PCI configuration through {}", bus.cam());
        for (base, size) in bus.windows() {
            info!("PCI: placing unassigned BARs in {base:#x}+{size:#x} (host bridge _CRS)");
        }
        for f in &functions {
            info!("PCI {f}");
        }
        Self {
            bus,
            functions,
            mapped,
            unrouted: Vec::new(),
        }
    }

    /// The virtio functions whose device id is one of `ids`, in bus order.
    pub fn virtio(&self, ids: &[u16]) -> Vec<Function> {
        self.functions
            .iter()
            .filter(|f| f.vendor_id == VIRTIO_VENDOR && ids.contains(&f.device_id))
            .cloned()
            .collect()
    }

    /// Routes `queues` of the virtio device `f` (already brought up by its
    /// driver: a reset clears the routing) to MSI-X, every entry pointing
    /// at `vector` (one of [`crate::interrupts`]'s). A device without MSI-X, or
    /// one that refuses the vector, is polled on a timer instead
    /// ([`crate::interrupts::poll_without_interrupt`]).
    pub fn interrupts(&mut self, f: &Function, queues: &[u16], vector: u8) {
        self.unrouted.retain(|a| *a != f.address);
        let msix = pci::msix::Msix::find(&mut self.bus, f);
        let common = pci::msix::virtio_common_cfg(&mut self.bus, f);
        let (Some(msix), Some(common)) = (msix, common) else {
            self.intx(f);
            return;
        };
        // SAFETY: the table and the common configuration are in `f`'s
        // memory BARs, mapped by `open_virtio`; only this function writes
        // the table, and the driver is not running (boot, one thread).
        let routed = unsafe {
            msix.enable(&mut self.bus, drivers::lapic::id(), vector);
            pci::msix::route_virtio_queues(common, queues)
        };
        if routed && msix.enabled(&self.bus) {
            info!(
                "{}: MSI-X on ({} entries), queues {queues:?} interrupt",
                f.address, msix.entries
            );
        } else {
            crate::interrupts::poll_without_interrupt(format_args!(
                "{} (MSI-X vector refused)",
                f.address
            ));
        }
    }

    /// A function without MSI-X interrupts through INTx, on the ISA IRQ
    /// the firmware gave it; without a line (or an I/O APIC) it is polled
    /// on a timer.
    fn intx(&mut self, f: &Function) {
        let isr = pci::msix::virtio_isr(&mut self.bus, f);
        let line = isr.and_then(|_| pci::msix::intx_line(&mut self.bus, f));
        let routed = match (isr, line) {
            // SAFETY: `isr` is the ISR byte in `f`'s memory BAR, mapped by
            // `open_virtio`.
            (Some(isr), Some(line)) => unsafe { crate::interrupts::route_intx(line, isr) },
            _ => false,
        };
        match line {
            Some(line) if routed => {
                // Only now: a refused line (COM2's, the power button's)
                // must not be held high by this function.
                pci::msix::enable_intx(&mut self.bus, f);
                info!("{}: no MSI-X: INTx on IRQ {line}", f.address);
            }
            _ => crate::interrupts::poll_without_interrupt(format_args!(
                "{} (no MSI-X, no usable INTx line)",
                f.address
            )),
        }
    }

    /// Opens `f`'s modern virtio transport, once its memory BARs are
    /// identity-mapped (those above the map are mapped here). Opening sizes the BARs that hold the
    /// virtio structures: it is done with decoding off (see
    /// `Bus::with_decode_off`).
    pub fn open_virtio(&mut self, f: &Function) -> Result<PciTransport, OpenError> {
        let mapped = self.mapped;
        for bar in f
            .bars
            .iter()
            .filter(|b| b.kind != pci::BarKind::Io && b.address + b.size > mapped)
        {
            // OVMF places 64-bit BARs far above RAM: map them (uncached).
            // SAFETY: a memory BAR is device memory that nothing else maps.
            if !unsafe { boot::paging::map_mmio(bar.address, bar.size) } {
                return Err(OpenError::AboveIdentityMap { bar: *bar, mapped });
            }
        }
        let df = f.address.device_function();
        let transport = self
            .bus
            .with_decode_off(df, |root| drivers::virtio::transport::open(root, df))
            .map_err(OpenError::Transport)?;
        self.unrouted.push(f.address);
        Ok(transport)
    }
}
