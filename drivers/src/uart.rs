//! 16550 UARTs: COM1 carries the console (log records, banner, halt report),
//! COM2 the QMP monitor. Built on `uart_16550`; reads never block.

use uart_16550::SerialPort;

pub const COM1: u16 = 0x3f8;
pub const COM2: u16 = 0x2f8;

/// The scratch register: a byte any 16550 keeps for software.
const SCRATCH: u16 = 7;
/// The line status register.
const LSR: u16 = 5;

/// One serial port, non-blocking on the receive side.
pub struct Uart {
    port: SerialPort,
}

impl Uart {
    /// Initialises the UART at `base` (115200 8N1, FIFOs on).
    ///
    /// # Safety
    /// `base` must be the I/O base of a 16550 that nothing else drives.
    pub unsafe fn new(base: u16) -> Self {
        // SAFETY: forwarded to the caller.
        let mut port = unsafe { SerialPort::new(base) };
        port.init();
        Self { port }
    }

    /// Initialises the UART at `base` if there is one. Reads from an I/O
    /// port with no device behind it return 0xFF, so a missing 16550's line
    /// status says "data ready" and "transmitter empty" forever: a reader
    /// would take 0xFF bytes without end and a writer would never wait.
    /// A 16550 keeps what is written to its scratch register, and its line
    /// status is never all ones.
    ///
    /// # Safety
    /// As [`Uart::new`]: if a 16550 is at `base`, nothing else drives it.
    pub unsafe fn probe(base: u16) -> Option<Self> {
        let keeps = |v: u8| {
            // SAFETY: the scratch register has no side effect on a 16550;
            // the caller owns whatever is at `base`.
            unsafe {
                crate::port::outb(base + SCRATCH, v);
                crate::port::inb(base + SCRATCH) == v
            }
        };
        if !(keeps(0x5a) && keeps(0xa5)) {
            return None;
        }
        // SAFETY: forwarded to the caller.
        let uart = unsafe { Self::new(base) };
        // SAFETY: reading the line status only clears its error flags,
        // which nothing here uses.
        let lsr = unsafe { crate::port::inb(base + LSR) };
        (lsr != 0xff).then_some(uart)
    }

    /// A handle for emergency output (fault and panic reports) that skips
    /// initialisation and any lock: the port was initialised at boot.
    ///
    /// # Safety
    /// Only for the failure path, where nothing else will run afterwards.
    pub unsafe fn steal(base: u16) -> Self {
        // SAFETY: forwarded to the caller.
        let port = unsafe { SerialPort::new(base) };
        Self { port }
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.port.send_raw(b);
        }
    }

    /// Writes as many bytes as the transmitter takes without waiting;
    /// returns how many were written.
    pub fn try_write(&mut self, bytes: &[u8]) -> usize {
        bytes
            .iter()
            .take_while(|&&b| self.port.try_send_raw(b).is_ok())
            .count()
    }

    /// Reads everything waiting in the receive FIFO into `buf`, returning how
    /// many bytes were read; 0 when nothing is waiting.
    pub fn read_available(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match self.port.try_receive() {
                Ok(b) => {
                    buf[n] = b;
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    }
}

impl core::fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.port.send_raw(b'\r');
            }
            self.port.send_raw(b);
        }
        Ok(())
    }
}
