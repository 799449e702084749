//! The QMP monitor on COM2 (placeholder until block::qmp lands).

use drivers::uart::{COM2, Uart};

pub struct Monitor {
    uart: Uart,
    quit: bool,
    line: alloc::vec::Vec<u8>,
}

impl Monitor {
    pub fn new() -> Self {
        // SAFETY: COM2 is the monitor's port; only this module drives it.
        Self { uart: unsafe { Uart::new(COM2) }, quit: false, line: alloc::vec::Vec::new() }
    }

    pub fn start(&mut self) {
        self.uart.write_bytes(b"{\"QMP\": {}}\r\n");
    }

    pub fn poll(&mut self) -> bool {
        let mut buf = [0u8; 256];
        let n = self.uart.read_available(&mut buf);
        self.line.extend_from_slice(&buf[..n]);
        if self.line.windows(4).any(|w| w == b"quit") {
            self.quit = true;
        }
        n > 0
    }

    pub fn halt_requested(&self) -> Option<crate::halt::Reason> {
        self.quit.then_some(crate::halt::Reason::HostQmpQuit)
    }
}
