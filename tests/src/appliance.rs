//! A running appliance: the QEMU child (killed on drop, so a failing test
//! leaves no stray process), its console captured from COM1, its QMP client.

use crate::qemu::QemuConfig;
use crate::qmp::Qmp;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Appliance {
    child: Child,
    console: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    qmp: Option<Qmp>,
    dir: tempfile::TempDir,
    exit: Option<ExitStatus>,
}

fn capture(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("console lock")
                .extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Appliance {
    /// Starts QEMU and connects to QMP (QEMU holds the guest until the
    /// client is there, so the greeting cannot be missed). The greeting is
    /// not read yet (under firmware it will be read past the firmware's
    /// output). Without COM2 ([`QemuConfig::com2`]) there is no QMP to
    /// connect to: the guest just runs.
    pub fn start(image: &Path, cfg: &QemuConfig) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("blockhaus-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let sock = dir.path().join("qmp.sock");
        let mut cmd = cfg.command(image, &sock);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
        let console = capture(child.stdout.take().expect("piped stdout"));
        let stderr = capture(child.stderr.take().expect("piped stderr"));
        let mut me = Self {
            child,
            console,
            stderr,
            qmp: None,
            dir,
            exit: None,
        };
        if !cfg.com2 {
            return Ok(me);
        }
        match Qmp::connect(&sock, Duration::from_secs(20)) {
            Ok(q) => me.qmp = Some(q),
            Err(e) => return Err(format!("QMP socket: {e}; qemu stderr: {}", me.stderr())),
        }
        // The firmware's own output comes first on COM2: the greeting is
        // read past it.
        me.qmp().after_firmware = cfg.firmware != crate::qemu::Firmware::None;
        Ok(me)
    }

    /// Starts the test image with `cfg`, reads the greeting and negotiates.
    pub fn boot(cfg: &QemuConfig) -> Self {
        let image = crate::image::for_tests();
        let mut me = Self::start(&image, cfg).unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = me.qmp().negotiate() {
            panic!(
                "QMP negotiation failed: {e}\nconsole:\n{}\nstderr:\n{}",
                me.console(),
                me.stderr()
            );
        }
        me
    }

    /// A negotiated connection to QEMU's own QMP monitor (not the
    /// appliance's), e.g. for `system_powerdown`.
    pub fn qemu_monitor(&self) -> Result<Qmp, String> {
        let sock = crate::qemu::qemu_monitor_socket(&self.dir.path().join("qmp.sock"));
        let mut q = Qmp::connect(&sock, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        q.negotiate()?;
        Ok(q)
    }

    /// The socket of virtio-serial QMP port `i` ([`QemuConfig::qmp_ports`]).
    pub fn qmp_port_socket(&self, i: usize) -> PathBuf {
        crate::qemu::qmp_port_socket(&self.dir.path().join("qmp.sock"), i)
    }

    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp
            .as_mut()
            .expect("QMP connected (the appliance has no COM2)")
    }

    /// Everything COM1 printed so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().expect("console lock")).into_owned()
    }

    /// What QEMU itself printed on stderr.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// A scratch directory that lives as long as the appliance.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Waits until the console contains `needle`.
    pub fn wait_console(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.console().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(format!(
            "console never showed {needle:?}; console:\n{}",
            self.console()
        ))
    }

    /// Waits for QEMU to exit; `None` on timeout (the child is then killed
    /// on drop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit {
                return Some(s);
            }
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.exit = Some(s);
                    // Let the capture threads drain the pipes.
                    std::thread::sleep(Duration::from_millis(20));
                    return Some(s);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return None,
            }
        }
    }

    /// `human-monitor-command` with `qemu-io NODE "CMD"`: qemu-io's output,
    /// whatever it says.
    pub fn qemu_io_output(&mut self, node: &str, cmd: &str) -> String {
        let line = format!("qemu-io {node} \"{cmd}\"");
        let r = self
            .qmp()
            .execute(
                "human-monitor-command",
                serde_json::json!({"command-line": line}),
            )
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        match r["return"].as_str() {
            Some(out) => out.to_string(),
            None => panic!("{line}: {r}"),
        }
    }

    /// `qemu-io NODE "CMD"` that must succeed (no error, no failed pattern
    /// verification); returns its output.
    pub fn qemu_io(&mut self, node: &str, cmd: &str) -> String {
        let out = self.qemu_io_output(node, cmd);
        let lower = out.to_lowercase();
        assert!(
            !lower.contains("error") && !lower.contains("fail"),
            "qemu-io {node} \"{cmd}\": {out}\nconsole:\n{}",
            self.console()
        );
        out
    }

    /// QMP `quit`: expects its reply, QEMU exit 0 and a block layer that
    /// closed completely; returns the console.
    pub fn quit(mut self) -> String {
        let reply = self
            .qmp()
            .execute("quit", serde_json::Value::Null)
            .expect("quit reply");
        assert_eq!(reply, serde_json::json!({"return": {}}), "quit reply");
        let status = self
            .wait_exit(Duration::from_secs(60))
            .expect("QEMU exits after quit");
        let console = self.console();
        assert_eq!(
            status.code(),
            Some(0),
            "QEMU exit status; console:\n{console}"
        );
        assert!(
            !console.contains("NODES LEFT OPEN") && !console.contains("close-all FAILED"),
            "close-all left nodes open:\n{console}"
        );
        console
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's CPU use (user and system, all threads) over the next `over`
    /// of wall time, as a share of one core.
    pub fn cpu_share(&self, over: Duration) -> Result<f64, String> {
        // USER_HZ: 100 on every Linux this runs on.
        const TICKS_PER_SECOND: f64 = 100.0;
        let before = self.cpu_ticks()?;
        let t0 = Instant::now();
        std::thread::sleep(over);
        let used = (self.cpu_ticks()? - before) as f64 / TICKS_PER_SECOND;
        Ok(used / t0.elapsed().as_secs_f64())
    }

    /// CPU time QEMU has used so far, in clock ticks: `/proc/PID/stat`
    /// fields 14 and 15 (utime, stime).
    fn cpu_ticks(&self) -> Result<u64, String> {
        let pid = self.pid();
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
        // The command name may contain spaces: fields start after the last ')'.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or("bad /proc stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize, name: &str| -> Result<u64, String> {
            fields
                .get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no {name} in /proc/{pid}/stat"))
        };
        Ok(field(11, "utime")? + field(12, "stime")?)
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if self.exit.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
