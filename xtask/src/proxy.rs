//! The QMP proxy of `cargo xtask run`.
//!
//! A 16550 cannot tell the guest that a client connected to QEMU's socket,
//! so the appliance sends its QMP greeting once, at boot. `run` therefore
//! holds COM2's socket itself (QEMU waits for it: `wait=on`) and offers a
//! socket of its own where every client gets the greeting, as with QEMU's
//! `-qmp`. One client at a time, like a QEMU chardev; a later client's
//! `qmp_capabilities` is answered here, since the appliance's session is
//! already negotiated. Events that arrive while no client is connected are
//! dropped, as QEMU drops them. What comes before the greeting (OVMF's
//! own console output on COM2) is dropped too.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    appliance: Arc<Mutex<UnixStream>>,
}

struct Shared {
    greeting: Mutex<Option<String>>,
    client: Mutex<Option<UnixStream>>,
    /// The appliance's session has been negotiated by some client.
    negotiated: Mutex<bool>,
}

impl Proxy {
    pub fn start(com2: &Path, user: &Path) -> Result<Self, String> {
        let stream = harness::qmp::connect_retry(com2, Duration::from_secs(20))
            .map_err(|e| format!("COM2 socket: {e}"))?;
        Self::over(stream, user)
    }

    /// A proxy over `stream`, COM2's socket before anything was read from
    /// it (e.g. the connection of a test harness's appliance).
    pub fn over(stream: UnixStream, user: &Path) -> Result<Self, String> {
        stream.set_read_timeout(None).map_err(|e| e.to_string())?;
        let listener = UnixListener::bind(user).map_err(|e| format!("{}: {e}", user.display()))?;
        let shared = Arc::new(Shared {
            greeting: Mutex::new(None),
            client: Mutex::new(None),
            negotiated: Mutex::new(false),
        });
        let appliance = Arc::new(Mutex::new(stream.try_clone().map_err(|e| e.to_string())?));

        // Appliance → client.
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            loop {
                let mut raw = Vec::new();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let mut line = String::from_utf8_lossy(&raw).into_owned();
                let mut greeting = s.greeting.lock().expect("lock");
                if greeting.is_none() {
                    // Under OVMF the firmware's console comes first on COM2:
                    // nothing before the greeting reaches a client.
                    let Some(at) = line.find("{\"QMP\"") else {
                        continue;
                    };
                    line.drain(..at);
                    *greeting = Some(line.clone());
                }
                drop(greeting);
                if let Some(c) = s.client.lock().expect("lock").as_mut() {
                    let _ = c.write_all(line.as_bytes());
                }
            }
        });

        // Clients, one at a time.
        let s = shared.clone();
        let to_appliance = appliance.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                serve(&s, &to_appliance, client);
            }
        });
        Ok(Self { appliance })
    }

    /// Sends `quit` to the appliance.
    pub fn quit(&self) {
        let _ = self
            .appliance
            .lock()
            .expect("lock")
            .write_all(b"{\"execute\": \"quit\"}\n");
    }
}

fn serve(s: &Shared, appliance: &Mutex<UnixStream>, mut client: UnixStream) {
    // Wait for the greeting (the guest may still be booting).
    let greeting = loop {
        if let Some(g) = s.greeting.lock().expect("lock").clone() {
            break g;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if client.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let Ok(reader) = client.try_clone() else {
        return;
    };
    *s.client.lock().expect("lock") = client.try_clone().ok();
    let mut client_negotiated = false;
    let stream = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    for value in stream {
        let value = match value {
            Ok(v) => v,
            Err(e) => {
                // The stream cannot be resynchronised here: say why and hang up.
                let reply = json!({"error": {"class": "GenericError", "desc": format!("JSON parse error, {e}")}});
                let _ = client.write_all(format!("{reply}\r\n").as_bytes());
                break;
            }
        };
        let is_caps = value.get("execute").and_then(Value::as_str) == Some("qmp_capabilities");
        let appliance_negotiated = *s.negotiated.lock().expect("lock");
        if is_caps && appliance_negotiated && !client_negotiated {
            let reply = match value.get("id") {
                Some(id) => format!("{{\"return\": {{}}, \"id\": {id}}}\r\n"),
                None => "{\"return\": {}}\r\n".to_string(),
            };
            client_negotiated = true;
            let _ = client.write_all(reply.as_bytes());
            continue;
        }
        if appliance_negotiated && !client_negotiated && !is_caps {
            let mut reply = json!({"error": {"class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}});
            if let Some(id) = value.get("id") {
                reply["id"] = id.clone();
            }
            let _ = client.write_all(format!("{reply}\r\n").as_bytes());
            continue;
        }
        if is_caps {
            *s.negotiated.lock().expect("lock") = true;
            client_negotiated = true;
        }
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        if appliance.lock().expect("lock").write_all(&line).is_err() {
            break;
        }
    }
    // The client may have only shut down its sending side and still wait for
    // replies: it stays the reply target until the next client connects.
}
