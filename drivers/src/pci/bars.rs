//! Base address registers: sizing them, and placing the ones the firmware
//! left unassigned (QEMU's microvm) in the host bridge's memory windows.

use super::{Bar, BarKind, Bus, Cam, Function};
use alloc::vec::Vec;
use virtio_drivers::transport::pci::bus::{BarInfo, Command, DeviceFunction, PciRoot};

/// The BARs of `function` (6 on an endpoint, 2 on a bridge). Call with
/// decoding off ([`Bus::with_decode_off`]): sizing writes the BARs.
pub(super) fn bars(root: &mut PciRoot<Cam>, function: DeviceFunction, count: u8) -> Vec<Bar> {
    let mut out = Vec::new();
    let mut index = 0;
    while index < count {
        let info = match root.bar_info(function, index) {
            Ok(Some(info)) => info,
            Ok(None) => {
                index += 1;
                continue;
            }
            Err(_) => break,
        };
        let wide = info.takes_two_entries();
        let bar = match info {
            BarInfo::IO { address, size } => Bar {
                index,
                kind: BarKind::Io,
                address: address.into(),
                size: size.into(),
            },
            BarInfo::Memory { address, size, .. } => Bar {
                index,
                kind: if wide { BarKind::Mem64 } else { BarKind::Mem32 },
                address,
                size,
            },
        };
        out.push(bar);
        index += if wide { 2 } else { 1 };
    }
    out
}

/// Places BARs the firmware left unassigned in the host bridge's windows:
/// naturally aligned (a BAR's size is a power of two), clear of every BAR
/// already in place. Pure: returns (function index, BAR index, address).
pub fn plan_bars(functions: &[Function], windows: &[(u64, u64)]) -> Vec<(usize, u8, u64)> {
    let mut used: Vec<(u64, u64)> = functions
        .iter()
        .flat_map(|f| &f.bars)
        .filter(|b| b.kind != BarKind::Io && b.address != 0)
        .map(|b| (b.address, b.size))
        .collect();
    let mut todo: Vec<(usize, &Bar)> = functions
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.bridge)
        .flat_map(|(i, f)| f.bars.iter().map(move |b| (i, b)))
        .filter(|(_, b)| b.kind != BarKind::Io && b.address == 0 && b.size.is_power_of_two())
        .collect();
    // Largest first packs naturally aligned ranges without holes.
    todo.sort_by_key(|(_, b)| core::cmp::Reverse(b.size));
    let mut out = Vec::new();
    for (i, bar) in todo {
        let fits = |w: &(u64, u64)| {
            let mut at = w.0.next_multiple_of(bar.size);
            while at + bar.size <= w.0 + w.1 {
                match used.iter().find(|&&(s, n)| at < s + n && s < at + bar.size) {
                    None => return Some(at),
                    Some(&(s, n)) => at = (s + n).next_multiple_of(bar.size),
                }
            }
            None
        };
        // A 32-bit BAR needs an address below 4 GiB.
        let Some(at) = windows
            .iter()
            .filter_map(fits)
            .find(|&a| bar.kind == BarKind::Mem64 || a + bar.size <= 1 << 32)
        else {
            continue;
        };
        used.push((at, bar.size));
        out.push((i, bar.index, at));
    }
    out
}

/// Writes the BARs [`plan_bars`] placed, then turns on memory decoding
/// and bus mastering for the functions whose memory BARs are all in place.
pub(super) fn assign_bars(bus_access: &mut Bus, found: &mut [Function]) {
    let plan = plan_bars(found, &bus_access.windows);
    for &(i, index, at) in &plan {
        let df = found[i].address.device_function();
        let Some(bar) = found[i].bars.iter_mut().find(|b| b.index == index) else {
            continue;
        };
        bus_access.with_decode_off(df, |root| match bar.kind {
            BarKind::Mem64 => root.set_bar_64(df, index, at),
            _ => root.set_bar_32(df, index, at as u32),
        });
        bar.address = at;
    }
    for f in found.iter().filter(|f| !f.bridge) {
        let memory = || f.bars.iter().filter(|b| b.kind != BarKind::Io);
        if memory().count() == 0 || memory().any(|b| b.address == 0) {
            continue;
        }
        let df = f.address.device_function();
        let (_, command) = bus_access.root.get_status_command(df);
        let wanted = command | Command::MEMORY_SPACE | Command::BUS_MASTER;
        if wanted != command {
            bus_access.root.set_command(df, wanted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::Address;

    fn function(device: u8, bars: &[(u8, BarKind, u64, u64)]) -> Function {
        Function {
            address: Address {
                bus: 0,
                device,
                function: 0,
            },
            vendor_id: 0x1af4,
            device_id: 0x1001,
            class: 1,
            subclass: 0,
            prog_if: 0,
            bridge: false,
            bars: bars
                .iter()
                .map(|&(index, kind, address, size)| Bar {
                    index,
                    kind,
                    address,
                    size,
                })
                .collect(),
        }
    }

    #[test]
    fn unassigned_bars_are_placed_aligned_and_clear_of_others() {
        let fs = [
            function(
                1,
                &[
                    (0, BarKind::Io, 0, 0x80),
                    (1, BarKind::Mem32, 0, 0x1000),
                    (4, BarKind::Mem64, 0, 0x4000),
                ],
            ),
            // Already placed by firmware at the window's start.
            function(2, &[(1, BarKind::Mem32, 0xc000_0000, 0x1000)]),
        ];
        let plan = plan_bars(&fs, &[(0xc000_0000, 0x2000_0000)]);
        assert_eq!(
            plan,
            alloc::vec![(0, 4, 0xc000_4000), (0, 1, 0xc000_1000)],
            "largest first, aligned, clear of 0xc0000000+0x1000, no I/O BARs"
        );
        assert!(plan_bars(&fs, &[]).is_empty());
        // A 32-bit BAR never lands above 4 GiB.
        let high = [(0x80_0000_0000, 0x1000_0000)];
        assert_eq!(plan_bars(&fs, &high), alloc::vec![(0, 4, 0x80_0000_0000)]);
    }
}
