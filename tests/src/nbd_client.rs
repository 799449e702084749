//! A small std TCP adapter around the sans-IO NBD client engine
//! (`block::nbd::client::Client`), so the engine the appliance runs can be
//! pointed at real servers (qemu-nbd, nbdkit) on the host.
//!
//! Blocking, one socket: [`NbdClient::submit`] queues requests (up to the
//! engine's 16 in flight), [`NbdClient::wait`] writes the engine's output
//! and feeds it the server's bytes until a given request completes. Every
//! socket read has a timeout, so a server that stops answering fails the
//! test instead of hanging it.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use block::io::IoError;
use block::nbd::client::SubmitError;
use block::nbd::client::{Client, ClientOp, ClientReply, ClientState, ExportInfo, Handle};

/// How long one socket read may wait before the test gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A connected client.
pub struct NbdClient {
    stream: TcpStream,
    engine: Client,
    done: BTreeMap<Handle, Result<ClientReply, IoError>>,
}

impl NbdClient {
    /// Connect to `addr` (`host:port`) and open `export`, asking for
    /// `base:allocation`. The error is the engine's open error (QEMU's
    /// text) or the socket's.
    pub fn connect(addr: &str, export: &str) -> Result<NbdClient, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut c = NbdClient {
            stream,
            engine: Client::new(export, true),
            done: BTreeMap::new(),
        };
        while c.engine.state() == &ClientState::Handshake {
            c.step().map_err(|e| format!("handshake: {e}"))?;
        }
        match c.engine.open_error() {
            Some(e) => Err(e.to_string()),
            None => Ok(c),
        }
    }

    /// What the server said about the export.
    pub fn info(&self) -> ExportInfo {
        *self.engine.info().expect("opened")
    }

    /// The engine's state.
    pub fn state(&self) -> &ClientState {
        self.engine.state()
    }

    /// Send everything pending, then read once and feed the engine (EOF
    /// is reported to it as a close).
    fn step(&mut self) -> io::Result<()> {
        self.flush_output()?;
        let mut buf = vec![0u8; 256 * 1024];
        let n = self.stream.read(&mut buf)?;
        if n == 0 {
            self.engine.closed();
        } else {
            self.engine.receive(&buf[..n]);
        }
        self.flush_output()
    }

    fn flush_output(&mut self) -> io::Result<()> {
        let out = self.engine.output().to_vec();
        if !out.is_empty() {
            self.stream.write_all(&out)?;
            self.engine.consume_output(out.len());
        }
        Ok(())
    }

    /// Queue a request.
    pub fn submit(&mut self, op: ClientOp) -> Result<Handle, SubmitError> {
        self.engine.submit(op)
    }

    /// Send what the queued requests need sent, without waiting for
    /// any reply.
    pub fn send(&mut self) -> io::Result<()> {
        self.flush_output()
    }

    /// Run until `h` completes.
    pub fn wait(&mut self, h: Handle) -> Result<ClientReply, IoError> {
        loop {
            while let Some((got, r)) = self.engine.next_completion() {
                self.done.insert(got, r);
            }
            if let Some(r) = self.done.remove(&h) {
                return r;
            }
            if self.step().is_err() {
                self.engine.closed();
            }
        }
    }

    /// Submit and wait.
    pub fn run(&mut self, op: ClientOp) -> Result<ClientReply, IoError> {
        match self.submit(op) {
            Ok(h) => self.wait(h),
            Err(SubmitError::Failed(e)) => Err(e),
            Err(SubmitError::Busy) => panic!("no request should be in flight"),
        }
    }

    /// Send `NBD_CMD_DISC` and wait for the server to close the socket.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.engine.disconnect();
        self.flush_output()?;
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest)?;
        Ok(())
    }
}
