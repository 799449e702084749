//! `BOOTX64.EFI`: the UEFI loader of the blockhaus disk image.
//!
//! It starts the PVH image (the very ELF that `-kernel` boots) the way a
//! PVH loader does, so the kernel has a single entry and owns its page
//! tables, GDT, IDT and stack from its first instruction:
//!
//! 1. reads `blockhaus.conf` from its own ESP (SimpleFileSystem on the
//!    LoadedImage's device, one Read: what works on OVMF and RHF alike);
//! 2. reads the PVH image from the disk's kernel partition (`disk.rs`:
//!    under rust-hypervisor-firmware with the project's virtio-blk driver,
//!    elsewhere through BlockIo) and checks it (`payload.rs`);
//! 3. lays the ELF's loadable segments out in a buffer as they lie in
//!    memory (the kernel is linked at 1 MiB up, where firmware may still
//!    live: rust-hypervisor-firmware keeps its page tables, GDT and stack
//!    at 1-2 MiB and loads this loader at 2 MiB);
//! 4. builds an `hvm_start_info` below 4 GiB: the command line
//!    (`blockhaus.boot-disk=` naming the PCI address of the disk it was
//!    loaded from, then its load options), the configuration file as
//!    module 0, the ACPI RSDP from
//!    the configuration table, and an E820 view of the final memory map;
//! 5. exits boot services and leaves long mode for 32-bit protected mode
//!    with paging off (`trampoline.s`, run from a page of its own), copies
//!    the buffer to the kernel's load address and enters `pvh_start` with
//!    `%ebx` pointing at the start info: the PVH boot protocol.
//!
//! Everything the loader allocates lies below 4 GiB and outside the
//! kernel's range (`mem.rs`), so only the last copy touches that range;
//! what comes from the UEFI pool (the global allocator: the configuration
//! as read, the virtio rings) is copied out or dropped before boot
//! services end, but the kernel partition's bytes, which are kept.
#![no_std]
#![no_main]

extern crate alloc;

mod disk;
mod elf;
mod mem;
mod payload;
mod start_info;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;
use uefi::boot::{self, MemoryType};
use uefi::prelude::*;
use uefi::proto::device_path::{DevicePath, DeviceSubType, DeviceType};
use uefi::proto::loaded_image::LoadedImage;
use uefi::proto::media::file::{File, FileAttribute, FileInfo, FileMode, RegularFile};
use uefi::proto::media::fs::SimpleFileSystem;

const CONFIG_FILE: &uefi::CStr16 = uefi::cstr16!("blockhaus.conf");
/// `blockhaus.conf`'s 8.3 alias, as `cargo xtask image` (crate `fatfs`)
/// and mtools' `mcopy` write it into a root directory that has no other
/// `BLOCKH~N.CON`. rust-hypervisor-firmware's File.Open finds only 8.3
/// names: a long one makes it panic and hang (it compares the NUL-padded
/// 255-byte name against the entry's long name and indexes past its end).
const CONFIG_FILE_8_3: &uefi::CStr16 = uefi::cstr16!("BLOCKH~1.CON");
/// Everything the kernel reads before it maps more must lie below 4 GiB.
const BELOW_4G: u64 = 0xffff_ffff;
const PAGE: usize = 4096;

core::arch::global_asm!(include_str!("trampoline.s"), options(att_syntax));

unsafe extern "C" {
    /// The position-independent stub in `trampoline.s`, copied to a page of
    /// its own and called there as [`PvhStub`].
    static blockhaus_pvh_stub: u8;
    static blockhaus_pvh_stub_end: u8;
}

/// Leaves long mode, copies `len` bytes from `src` to `dst` with paging
/// off and jumps to `entry` in 32-bit protected mode with
/// `%ebx = start_info` (`trampoline.s`).
type PvhStub =
    unsafe extern "sysv64" fn(start_info: u32, entry: u32, src: u32, dst: u32, len: u32) -> !;

/// Writes one short line on ConOut, in one OutputString call: under
/// 128 characters, the most rust-hypervisor-firmware takes at once (it
/// writes each call's 128-character buffer whole, the NULs after the text
/// included, so a line written in parts comes out torn).
fn say(msg: &str) {
    let line = alloc::format!("blockhaus-efi: {msg}\n");
    uefi::system::with_stdout(|out| {
        let _ = out.write_str(&line);
    });
}

/// Reports a failure and returns its status to the firmware.
fn fail(msg: &str, status: Status) -> Status {
    say(msg);
    status
}

#[entry]
fn main() -> Status {
    // The boot manager arms a 5-minute watchdog; boot services end soon,
    // which disarms it too, but a slow read must not reset the machine.
    let _ = boot::set_watchdog_timer(0, 0x10000, None);
    let rhf = is_rhf();
    let device = match boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle()) {
        Ok(image) => image.device(),
        Err(e) => return fail("cannot open LoadedImage", e.status()),
    };
    let Some(device) = device else {
        return fail("loaded from no device", Status::NOT_FOUND);
    };
    // The configuration first: under RHF the kernel read below takes the
    // boot disk from the firmware's own driver.
    let conf = match read_config(device, rhf) {
        Ok(c) => c,
        Err(status) => return status,
    };
    let (kernel, rhf_disk) = match read_kernel(device, rhf) {
        Ok(k) => k,
        Err((msg, status)) => return fail(msg, status),
    };
    let kernel = match elf::Image::parse(kernel) {
        Ok(k) => k,
        Err(e) => return fail(e, Status::LOAD_ERROR),
    };
    let range = kernel.range();
    let mut info = match start_info::StartInfo::allocate(range) {
        Ok(i) => i,
        Err(_) => {
            return fail(
                "no memory below 4 GiB for the start info",
                Status::OUT_OF_RESOURCES,
            );
        }
    };
    if let Err(status) = command_line(&mut info, device, rhf_disk) {
        return status;
    }
    if let Some(conf) = conf {
        // An empty file still gets a valid address.
        let pages = conf.len() / PAGE + 1;
        let Ok(at) = mem::allocate(pages, MemoryType::LOADER_DATA, range) else {
            return fail("no memory for blockhaus.conf", Status::OUT_OF_RESOURCES);
        };
        // SAFETY: `pages` pages were just allocated at `at`, more than
        // `conf.len()` bytes.
        unsafe {
            at.as_ptr()
                .copy_from_nonoverlapping(conf.as_ptr(), conf.len())
        };
        info.set_module(at.as_ptr() as u64, conf.len() as u64);
    }
    if range.1 > BELOW_4G || !mem::is_ram(range) {
        return fail("the kernel's range 1 MiB+ is not RAM", Status::LOAD_ERROR);
    }
    let len = range.1 - range.0;
    let pages = len.div_ceil(PAGE as u64) as usize;
    let Ok(staging) = mem::allocate(pages, MemoryType::LOADER_DATA, range) else {
        return fail("no memory for the kernel", Status::OUT_OF_RESOURCES);
    };
    // SAFETY: `pages` pages were just allocated at `staging`, identity-mapped.
    unsafe { kernel.load(staging.as_ptr()) };
    let stub = match copy_stub(range) {
        Ok(stub) => stub,
        Err(status) => return fail("no memory for the trampoline", status),
    };

    let rsdp = uefi::system::with_config_table(|t| {
        t.iter()
            .find(|e| e.guid == uefi::table::cfg::ConfigTableEntry::ACPI2_GUID)
            .or_else(|| {
                t.iter()
                    .find(|e| e.guid == uefi::table::cfg::ConfigTableEntry::ACPI_GUID)
            })
            .map(|e| e.address as u64)
    });
    info.set_rsdp(rsdp.unwrap_or(0));
    say("starting the appliance");

    // SAFETY: nothing of boot services is used after this point: no
    // protocol is held, the console is not written any more, and nothing
    // is freed to the pool any more (`conf` was dropped above, the kernel
    // partition's bytes are kept for good).
    let map = unsafe { boot::exit_boot_services(None) };
    info.set_memory_map(&map);
    let entry = kernel.entry();
    // SAFETY: the stub, the kernel's laid-out copy, the start info and
    // everything it points to lie below 4 GiB, identity-mapped and outside
    // the kernel's range, which is RAM (`mem::is_ram`); boot services are
    // gone: the machine is ours, including what the firmware kept there.
    unsafe {
        stub(
            info.address(),
            entry,
            staging.as_ptr() as u32,
            range.0 as u32,
            len as u32,
        )
    }
}

/// The kernel partition's bytes as read, kept (in the pool, never freed)
/// until the loader is done: they are read only until `elf::Image::load`
/// has laid the kernel out elsewhere, and nothing is freed to the pool
/// after boot services end.
fn keep(bytes: Vec<u8>) -> &'static [u8] {
    bytes.leak()
}

/// A message for the console and the status to return to the firmware.
type Failure = (&'static str, Status);

/// The kernel ELF, read from the kernel partition (`disk.rs`) and
/// unpacked; under RHF also the device number of the disk it was read
/// from (the boot disk, which RHF's device paths do not name).
fn read_kernel(device: Handle, rhf: bool) -> Result<(&'static [u8], Option<u8>), Failure> {
    let err = |msg| (msg, Status::LOAD_ERROR);
    if !rhf {
        let mut disk = disk::BlockIoDisk::open(device).map_err(err)?;
        let (header, bytes) = disk::read_kernel(&mut disk).map_err(err)?;
        let kernel = payload::kernel(&header, keep(bytes)).map_err(err)?;
        return Ok((kernel, None));
    }
    // RHF boots the first modern virtio-blk device it can boot from: the
    // first, in device order, that holds a kernel partition is ours.
    let mut last = "no modern virtio-blk device on bus 0";
    for dev in rhf_virtio_disks() {
        let mut disk = match disk::VirtioDisk::open(dev) {
            Ok(d) => d,
            Err(e) => {
                last = e;
                continue;
            }
        };
        match disk::read_kernel(&mut disk) {
            Ok((header, bytes)) => {
                // Resets the device before the kernel sees it.
                drop(disk);
                let kernel = payload::kernel(&header, keep(bytes)).map_err(err)?;
                return Ok((kernel, Some(dev)));
            }
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

/// Copies the trampoline stub to a code page of its own, outside `avoid`.
fn copy_stub(avoid: mem::Range) -> Result<PvhStub, Status> {
    let start = &raw const blockhaus_pvh_stub;
    let len = (&raw const blockhaus_pvh_stub_end).addr() - start.addr();
    let page = mem::allocate(len.div_ceil(PAGE), MemoryType::LOADER_CODE, avoid)?;
    // SAFETY: the stub's bytes lie in our image; the page was just
    // allocated to us and is large enough.
    unsafe { page.as_ptr().copy_from_nonoverlapping(start, len) };
    // SAFETY: the page now holds the position-independent stub, whose
    // entry is its first byte, with the signature of `PvhStub`; LOADER_CODE
    // pages are executable.
    Ok(unsafe { core::mem::transmute::<*mut u8, PvhStub>(page.as_ptr()) })
}

/// A PCI address `BB:DD.F` in a fixed buffer.
struct Bdf([u8; 7]);

impl Bdf {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// Fills the command line: the PCI address of the disk we were loaded
/// from (when its device path names one device on the root bus; under
/// RHF, `rhf_disk`, the disk the kernel was read from), then our load
/// options.
fn command_line(
    info: &mut start_info::StartInfo,
    device: Handle,
    rhf_disk: Option<u8>,
) -> Result<(), Status> {
    let named = boot::open_protocol_exclusive::<DevicePath>(device)
        .ok()
        .and_then(|path| pci_address(&path));
    if let Some(bdf) = named.or_else(|| rhf_disk.map(|dev| bdf(dev, 0))) {
        info.push_cmdline("blockhaus.boot-disk=");
        info.push_cmdline(bdf.as_str());
    }
    let image = boot::open_protocol_exclusive::<LoadedImage>(boot::image_handle())
        .map_err(|e| fail("cannot open LoadedImage", e.status()))?;
    load_options(&image, info)
}

/// `blockhaus.conf` from the ESP (`device`'s file system), if it has one.
fn read_config(device: Handle, rhf: bool) -> Result<Option<Vec<u8>>, Status> {
    let mut fs = boot::open_protocol_exclusive::<SimpleFileSystem>(device)
        .map_err(|e| fail("cannot open the ESP's file system", e.status()))?;
    let mut root = fs
        .open_volume()
        .map_err(|e| fail("cannot open the ESP", e.status()))?;
    let (name, shown) = if rhf {
        (CONFIG_FILE_8_3, "blockhaus.conf (as BLOCKH~1.CON)")
    } else {
        (CONFIG_FILE, "blockhaus.conf")
    };
    let Ok(mut file) = root.open(name, FileMode::Read, FileAttribute::empty()) else {
        say(&alloc::format!("no {shown} on the ESP: booting without it"));
        return Ok(None);
    };
    // Room for a 255-character name: rust-hypervisor-firmware wants room
    // for that much (592 bytes) whatever the name.
    #[repr(C, align(8))]
    struct InfoBuf([u8; 1024]);
    let mut buf = InfoBuf([0; 1024]);
    // The attribute, not `into_regular_file`: that asks GetPosition, which
    // rust-hypervisor-firmware does not implement.
    let size = match file.get_info::<FileInfo>(&mut buf.0) {
        Ok(i) if i.attribute().contains(FileAttribute::DIRECTORY) => {
            return Err(fail("blockhaus.conf is not a file", Status::LOAD_ERROR));
        }
        Ok(i) => i.file_size(),
        Err(e) => {
            say(&alloc::format!(
                "cannot stat blockhaus.conf: {:?}",
                e.status()
            ));
            return Err(e.status());
        }
    };
    let Ok(size) = usize::try_from(size).map(|s| s.min(1 << 30)) else {
        return Err(fail("blockhaus.conf is too large", Status::LOAD_ERROR));
    };
    // SAFETY: the handle is open and not a directory (checked just above).
    let mut file = unsafe { RegularFile::new(file) };
    let mut conf = vec![0; size];
    // Reads ask for exactly what is left: rust-hypervisor-firmware fails
    // with DEVICE_ERROR when asked for more than the file holds, and with
    // BUFFER_TOO_SMALL when asked for less.
    let mut got = 0usize;
    while got < size {
        match file.read(&mut conf[got..size]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(fail("cannot read blockhaus.conf", e.status())),
        }
    }
    conf.truncate(got);
    Ok(Some(conf))
}

/// Appends the load options (UCS-2 text: what the UEFI Shell or a boot
/// entry made with `efibootmgr -u` passes) to the command line, as
/// `-append` does under `-kernel`. The Shell passes the whole command
/// line: a first word naming a `.efi` file is our own path and dropped.
fn load_options(image: &LoadedImage, info: &mut start_info::StartInfo) -> Result<(), Status> {
    use uefi::proto::loaded_image::LoadOptionsError;
    let text = match image.load_options_as_cstr16() {
        Ok(t) => t,
        Err(LoadOptionsError::NotSet) => return Ok(()),
        Err(_) => {
            say("load options are not UCS-2 text: not used");
            return Ok(());
        }
    };
    let mut line = [0u8; 4096];
    let mut len = 0;
    for c in text.iter() {
        let c = u16::from(*c);
        // Anything but printable ASCII becomes '?', which the kernel refuses
        // by name rather than reading it wrong.
        let b = match c {
            0x20..=0x7e => c as u8,
            0x09 | 0x0a | 0x0d => b' ',
            _ => b'?',
        };
        if len == line.len() {
            return Err(fail(
                "load options longer than 4 KiB",
                Status::BAD_BUFFER_SIZE,
            ));
        }
        line[len] = b;
        len += 1;
    }
    let text = core::str::from_utf8(&line[..len]).unwrap_or("").trim();
    let text = match text.split_once(' ') {
        Some((first, rest)) if is_efi_path(first) => rest,
        None if is_efi_path(text) => "",
        _ => text,
    };
    let text = text.trim();
    if !text.is_empty() && !(info.push_cmdline(" ") && info.push_cmdline(text)) {
        return Err(fail(
            "load options do not fit the 4 KiB command line",
            Status::BAD_BUFFER_SIZE,
        ));
    }
    Ok(())
}

/// Whether `word` names an EFI application (ends in `.efi`, any case).
fn is_efi_path(word: &str) -> bool {
    word.len() >= 4 && word.as_bytes()[word.len() - 4..].eq_ignore_ascii_case(b".efi")
}

/// Whether the firmware is rust-hypervisor-firmware (its vendor is "RHF").
fn is_rhf() -> bool {
    uefi::system::firmware_vendor() == uefi::cstr16!("RHF")
}

/// The modern-only virtio-blk devices (1af4:1042) at function 0 of bus
/// 0, in device order: the only disks rust-hypervisor-firmware boots from.
fn rhf_virtio_disks() -> impl Iterator<Item = u8> {
    use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
    // SAFETY: PCI configuration mechanism #1 (ports 0xcf8/0xcfc), which
    // every x86 machine RHF runs on has; boot services run on one CPU and
    // nothing else uses the ports while the loader runs.
    let cam = unsafe { drivers::pci::PortIoCam::new() };
    (0u8..32).filter(move |&dev| {
        let function = DeviceFunction {
            bus: 0,
            device: dev,
            function: 0,
        };
        cam.read_word(function, 0) == 0x1042_1af4
    })
}

/// `00:DD.F`.
fn bdf(dev: u8, func: u8) -> Bdf {
    let hex = |n: u8| b"0123456789abcdef"[n as usize & 15];
    Bdf([
        b'0',
        b'0',
        b':',
        hex(dev >> 4),
        hex(dev),
        b'.',
        b'0' + (func & 7),
    ])
}

/// `00:DD.F` when the path has exactly one PCI node (a device on the root
/// bus); behind a bridge the bus number is not in the path.
fn pci_address(path: &DevicePath) -> Option<Bdf> {
    let mut found = None;
    let mut count = 0;
    for node in path.node_iter() {
        if node.device_type() == DeviceType::HARDWARE
            && node.sub_type() == DeviceSubType::HARDWARE_PCI
        {
            let data = node.data();
            if data.len() >= 2 {
                found = Some((data[1], data[0]));
                count += 1;
            }
        }
    }
    let (dev, func) = found.filter(|_| count == 1)?;
    Some(bdf(dev, func))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut com1 = start_info::Com1;
    let _ = write!(com1, "\nblockhaus-efi: PANIC: {info}\n");
    // SAFETY: the isa-debug-exit port (QEMU exits 33); without the device
    // the write goes nowhere and we halt below.
    unsafe { core::arch::asm!("out dx, al", in("dx") 0xf4u16, in("al") 0x10u8) };
    loop {
        // SAFETY: stops the CPU; nothing is left to run.
        unsafe { core::arch::asm!("cli; hlt") };
    }
}
