//! A small QMP client over a unix socket, for tests and xtask: greeting,
//! negotiation, commands with or without `id`, raw bytes, events.

use serde_json::{Value, json};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies, oldest first.
    pub events: VecDeque<Value>,
    /// The greeting, once read.
    pub greeting: Option<Value>,
    /// Firmware wrote to this port before the appliance: the greeting is
    /// read with [`Qmp::read_greeting_after_firmware`].
    pub after_firmware: bool,
    /// The request that got no reply within the read timeout: its reply
    /// may still come and would be taken for the next one's, so every
    /// later request fails at once, naming it.
    hung: Option<String>,
}

/// Connects to a unix socket, retrying until it exists or `timeout` passes.
pub fn connect_retry(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e),
        }
    }
}

fn timeout_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

impl Qmp {
    /// Connects to `path`, retrying until it exists (QEMU creates it at
    /// startup), without reading anything.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let stream = connect_retry(path, timeout)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: VecDeque::new(),
            greeting: None,
            after_firmware: false,
            hung: None,
        })
    }

    /// Sets how long a read may wait.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.writer.set_read_timeout(Some(timeout))
    }

    /// Reads the next JSON message (reply, event or greeting).
    pub fn recv(&mut self) -> io::Result<Value> {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        timeout_error("timed out waiting for QMP")
                    }
                    _ => e,
                })?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "QMP connection closed",
                ));
            }
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            return serde_json::from_str(trimmed).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad QMP line {trimmed:?}: {e}"),
                )
            });
        }
    }

    /// Reads the greeting (`{"QMP": ...}`).
    pub fn read_greeting(&mut self) -> io::Result<Value> {
        if self.after_firmware {
            return self.read_greeting_after_firmware().map(|(g, _)| g);
        }
        let g = self.recv()?;
        if g.get("QMP").is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a QMP greeting: {g}"),
            ));
        }
        self.greeting = Some(g.clone());
        Ok(g)
    }

    /// Reads the greeting after firmware output: OVMF writes its console
    /// to COM2 too until the appliance starts (escape sequences, `BdsDxe:`
    /// lines, the loader's messages), so every line before the one holding
    /// `{"QMP"` is skipped. Returns the skipped bytes with the greeting.
    pub fn read_greeting_after_firmware(&mut self) -> io::Result<(Value, Vec<u8>)> {
        let mut skipped = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = self.reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "QMP connection closed before the greeting",
                ));
            }
            let Some(at) = line.windows(6).position(|w| w == b"{\"QMP\"") else {
                skipped.extend_from_slice(&line);
                continue;
            };
            skipped.extend_from_slice(&line[..at]);
            let g: Value = serde_json::from_slice(line[at..].trim_ascii())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            self.greeting = Some(g.clone());
            return Ok((g, skipped));
        }
    }

    /// Reads messages until one that is not an event, queueing events.
    pub fn recv_reply(&mut self) -> io::Result<Value> {
        loop {
            let v = self.recv()?;
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else {
                return Ok(v);
            }
        }
    }

    /// Writes raw bytes to the monitor.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// Sends a request object and returns the whole reply object. A
    /// request without a reply within the read timeout fails with a
    /// `TimedOut` error naming it, and so does every later request.
    pub fn request(&mut self, request: &Value) -> io::Result<Value> {
        if let Some(hung) = &self.hung {
            return Err(timeout_error(&format!(
                "QMP out of step: no reply to the earlier {hung}"
            )));
        }
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.send_raw(&line)?;
        self.recv_reply().map_err(|e| {
            if e.kind() != io::ErrorKind::TimedOut {
                return e;
            }
            let timeout = self.writer.read_timeout().ok().flatten();
            let hung = format!("{request} (waited {timeout:?}: the appliance hung?)");
            let e = timeout_error(&format!("no reply to {hung}"));
            self.hung = Some(hung);
            e
        })
    }

    /// `execute` with arguments; returns the whole reply object.
    pub fn execute(&mut self, name: &str, arguments: Value) -> io::Result<Value> {
        let req = if arguments.is_null() {
            json!({"execute": name})
        } else {
            json!({"execute": name, "arguments": arguments})
        };
        self.request(&req)
    }

    /// `execute`, expecting success: returns the `return` value.
    pub fn cmd(&mut self, name: &str, arguments: Value) -> Result<Value, String> {
        let reply = self
            .execute(name, arguments)
            .map_err(|e| format!("{name}: {e}"))?;
        match reply.get("return") {
            Some(v) => Ok(v.clone()),
            None => Err(format!("{name} failed: {reply}")),
        }
    }

    /// Greeting plus `qmp_capabilities`.
    pub fn negotiate(&mut self) -> Result<Value, String> {
        let greeting = match &self.greeting {
            Some(g) => g.clone(),
            None => self.read_greeting().map_err(|e| format!("greeting: {e}"))?,
        };
        self.cmd("qmp_capabilities", Value::Null)?;
        Ok(greeting)
    }

    /// Waits for an event named `name`, looking at queued events first.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> io::Result<Value> {
        if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(pos).expect("position is valid"));
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let v = self.recv()?;
            if v["event"] == name {
                return Ok(v);
            }
            self.events.push_back(v);
        }
        Err(timeout_error(name))
    }
}
