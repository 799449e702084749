//! Randomness for TLS: the CPU's RDSEED (entropy straight from its
//! conditioner) where it has one, else RDRAND (its DRBG, reseeded from
//! the same source), else a virtio-rng device ([`probe`]). Registered as
//! the `getrandom` crate's source, which the RustCrypto provider of
//! [`nbdtls`] draws from (key shares, nonces, RSA blinding).
//!
//! Without any (QEMU's default TCG CPU has neither instruction: boot with
//! `-cpu max` or `-cpu host`, or add `-device virtio-rng-pci`) there is no
//! source: TLS is refused when `nbd-server-start` asks for it
//! ([`available`]), and a draw that happened anyway fails rather than
//! returning predictable bytes.

use core::arch::x86_64::{__cpuid, __cpuid_count};
use core::num::NonZeroU32;
use drivers::virtio::rng::{RNG_IDS, RngDevice};

use crate::pci::Pci;

/// The virtio-rng device, when there is one.
struct Virtio(RngDevice);

// SAFETY: one CPU; the device is used only from the main loop (through
// `getrandom`), never from an interrupt handler.
unsafe impl Send for Virtio {}

static VIRTIO: spin::Mutex<Option<Virtio>> = spin::Mutex::new(None);

/// Why TLS cannot run, for the QMP error.
pub const NO_SOURCE: &str = "TLS needs a random source: the CPU has no RDRAND or RDSEED \
     (boot QEMU with -cpu max or -cpu host) and there is no virtio-rng device \
     (-device virtio-rng-pci)";

/// `getrandom`'s code for "no source" (a custom code, above its own).
const NO_SOURCE_CODE: u32 = getrandom::Error::CUSTOM_START + 1;
/// `getrandom`'s code for "the CPU kept failing to deliver".
const EXHAUSTED_CODE: u32 = getrandom::Error::CUSTOM_START + 2;

/// Tries per word before giving up (Intel's guidance for RDRAND is 10;
/// RDSEED may underflow for longer).
const RETRIES: usize = 100;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Rdseed,
    Rdrand,
}

fn source() -> Option<Source> {
    if __cpuid(0).eax >= 7 && __cpuid_count(7, 0).ebx & (1 << 18) != 0 {
        return Some(Source::Rdseed);
    }
    if __cpuid(1).ecx & (1 << 30) != 0 {
        return Some(Source::Rdrand);
    }
    None
}

/// Brings up the first virtio-rng device of the boot-time PCI scan, if
/// any (kept even when the CPU has RDRAND: it is not used then).
pub fn probe(pci: &mut Pci) {
    let Some(f) = pci.virtio(&RNG_IDS).into_iter().next() else {
        return;
    };
    let dev = pci
        .open_virtio(&f)
        .map_err(|e| alloc::format!("{e}"))
        .and_then(RngDevice::new);
    match dev {
        Ok(d) => {
            log::info!("{} virtio-rng", f.address);
            *VIRTIO.lock() = Some(Virtio(d));
        }
        Err(e) => log::warn!("{}: {e}", f.address),
    }
}

fn have_virtio() -> bool {
    VIRTIO.lock().is_some()
}

/// Whether there is a random source.
pub fn available() -> bool {
    source().is_some() || have_virtio()
}

/// The source's name, for the log.
pub fn describe() -> &'static str {
    match source() {
        Some(Source::Rdseed) => "RDSEED",
        Some(Source::Rdrand) => "RDRAND",
        None if have_virtio() => "virtio-rng",
        None => "none",
    }
}

/// One 64-bit word from `src`, or `None` when it kept failing.
fn word(src: Source) -> Option<u64> {
    let mut v = 0u64;
    for _ in 0..RETRIES {
        // SAFETY: the instruction exists (CPUID said so in `source`); it
        // only writes `v`.
        let ok = unsafe {
            match src {
                Source::Rdseed => rdseed(&mut v),
                Source::Rdrand => rdrand(&mut v),
            }
        };
        if ok {
            return Some(v);
        }
        core::hint::spin_loop();
    }
    None
}

/// Callable (in `unsafe`) only where CPUID reports RDSEED.
#[target_feature(enable = "rdseed")]
fn rdseed(v: &mut u64) -> bool {
    core::arch::x86_64::_rdseed64_step(v) == 1
}

/// Callable (in `unsafe`) only where CPUID reports RDRAND.
#[target_feature(enable = "rdrand")]
fn rdrand(v: &mut u64) -> bool {
    core::arch::x86_64::_rdrand64_step(v) == 1
}

/// Fills `dest` from the CPU's source.
pub fn fill(dest: &mut [u8]) -> Result<(), getrandom::Error> {
    let code = |c| getrandom::Error::from(NonZeroU32::new(c).unwrap_or(NonZeroU32::MIN));
    let Some(src) = source() else {
        let Some(mut dev) = VIRTIO.try_lock() else {
            return Err(code(EXHAUSTED_CODE));
        };
        return match dev.as_mut() {
            Some(Virtio(d)) => d.fill(dest).map_err(|e| {
                log::warn!("{e}");
                code(EXHAUSTED_CODE)
            }),
            None => Err(code(NO_SOURCE_CODE)),
        };
    };
    for chunk in dest.chunks_mut(8) {
        let w = word(src).ok_or_else(|| code(EXHAUSTED_CODE))?;
        chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
    }
    Ok(())
}

getrandom::register_custom_getrandom!(fill);
