//! The QEMU command line for blockhaus: PVH `-kernel` (or the disk image
//! under OVMF or rust-hypervisor-firmware), COM1 console, COM2 QMP on a unix socket, `isa-debug-exit`
//! for failure codes, disks, and the machine and accelerator.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    Q35,
    Pc,
    Microvm,
}

impl Machine {
    pub const ALL: [Machine; 3] = [Machine::Q35, Machine::Pc, Machine::Microvm];

    pub fn name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
            Machine::Microvm => "microvm",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tcg" => Some(Accel::Tcg),
            "kvm" => Some(Accel::Kvm),
            _ => None,
        }
    }
}

/// What starts the appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's `-kernel` with the PVH ELF (SeaBIOS on pc/q35).
    None,
    /// OVMF (Debian's `ovmf`) from pflash, booting the GPT disk image
    /// (`cargo xtask image`) as the first virtio-blk disk, serial `boot`.
    /// The variable store is a copy next to the QMP socket.
    Ovmf,
    /// rust-hypervisor-firmware (cloud-hypervisor/rust-hypervisor-firmware,
    /// not packaged: [`QemuConfig::firmware_path`] or [`rhf_binary`]),
    /// started by QEMU's `-kernel` as its README says, booting the GPT disk
    /// image from the first modern-only virtio-blk device on the root bus
    /// (`disable-legacy=on`, which is all it drives), serial `boot`.
    Rhf,
}

impl Firmware {
    pub fn name(self) -> &'static str {
        match self {
            Firmware::None => "none",
            Firmware::Ovmf => "ovmf",
            Firmware::Rhf => "rhf",
        }
    }
}

/// The environment variable naming a rust-hypervisor-firmware binary.
pub const RHF_ENV: &str = "BLOCKHAUS_RHF";

/// The rust-hypervisor-firmware binary `BLOCKHAUS_RHF` names, if it is set
/// and not empty.
pub fn rhf_binary() -> Option<PathBuf> {
    std::env::var_os(RHF_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Debian's OVMF build (package `ovmf`): code and the variable template.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

/// The serial of the boot disk under firmware.
pub const BOOT_DISK_SERIAL: &str = "boot";

/// `isa-debug-exit` turns a guest write of `v` into QEMU exit `(v << 1) | 1`;
/// the kernel writes 0x10 on a fatal error.
pub const FAILURE_EXIT_STATUS: i32 = (0x10 << 1) | 1;

/// Everything that varies between appliance runs.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub machine: Machine,
    pub accel: Accel,
    pub memory: String,
    /// The kernel command line (`-append`).
    pub append: String,
    /// Raw disk files, attached as virtio-blk with serials disk0, disk1, ...
    pub disks: Vec<PathBuf>,
    /// A UART on COM2 carrying QMP (on by default). Without it the
    /// appliance runs on its boot options alone, and
    /// [`crate::Appliance::start`] connects no QMP client.
    pub com2: bool,
    /// COM2's socket: QEMU waits for the first QMP client before starting
    /// the guest (`wait=on`), so the client sees the greeting.
    pub qmp_wait: bool,
    /// QMP on virtio-serial: a `virtio-serial-pci` with this many
    /// `virtserialport`s named `org.qemu.qmp.0`, `org.qemu.qmp.1`, ...,
    /// each on its own socket ([`qmp_port_socket`], `wait=off`: clients
    /// connect and reconnect whenever they like).
    pub qmp_ports: usize,
    /// Extra raw arguments.
    pub extra: Vec<OsString>,
    /// NBD from the host: a virtio-net device on QEMU's user network, with
    /// 127.0.0.1:PORT forwarded to the guest's port 10809 ([`free_port`]
    /// picks one). The guest is 10.0.2.15/24, the gateway 10.0.2.2.
    pub nbd_port: Option<u16>,
    /// The fast path: QEMU runs inside this network namespace with a
    /// virtio-net device on its tap ([`NetnsTap`]); clients reach the guest
    /// at [`NetnsTap::GUEST_IP`] from inside the namespace.
    pub netns_tap: Option<NetnsTap>,
    /// Extra `virtio-net-pci` properties for either network (e.g.
    /// `,csum=off` or `,host_mtu=9000`), starting with a comma.
    pub net_opts: String,
    /// [`Firmware::None`]: the image is the PVH ELF; otherwise it is the
    /// disk image the firmware boots.
    pub firmware: Firmware,
    /// The firmware binary for [`Firmware::Rhf`] (default: [`rhf_binary`]).
    pub firmware_path: Option<PathBuf>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            machine: Machine::Q35,
            accel: Accel::Tcg,
            memory: "256M".into(),
            append: String::new(),
            disks: Vec::new(),
            com2: true,
            qmp_wait: true,
            qmp_ports: 0,
            extra: Vec::new(),
            nbd_port: None,
            netns_tap: None,
            net_opts: String::new(),
            firmware: Firmware::None,
            firmware_path: None,
        }
    }
}

impl QemuConfig {
    pub fn machine(mut self, m: Machine) -> Self {
        self.machine = m;
        self
    }

    pub fn append(mut self, a: impl Into<String>) -> Self {
        self.append = a.into();
        self
    }

    /// The QEMU command. COM1 goes to QEMU's stdout; COM2 (if any) to
    /// `qmp_socket`.
    pub fn command(&self, image: &Path, qmp_socket: &Path) -> Command {
        let mut cmd = match &self.netns_tap {
            Some(t) => t.exec("qemu-system-x86_64"),
            None => Command::new("qemu-system-x86_64"),
        };
        let machine = match self.machine {
            // microvm: PCI (for virtio-pci devices), the ACPI GED for
            // poweroff, and the RTC (off by default under KVM) for wall time.
            Machine::Microvm => "microvm,pcie=on,acpi=on,rtc=on".to_string(),
            m => m.name().to_string(),
        };
        cmd.args(["-machine", &machine, "-m", &self.memory]);
        match self.accel {
            Accel::Tcg => cmd.args(["-accel", "tcg"]),
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"]),
        };
        cmd.args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-no-user-config",
        ]);
        match self.firmware {
            Firmware::None => {
                cmd.arg("-kernel").arg(image);
            }
            Firmware::Ovmf => {
                let vars = qmp_socket.with_file_name("OVMF_VARS.fd");
                // A missing template shows up as QEMU's own error.
                let _ = std::fs::copy(OVMF_VARS, &vars);
                cmd.arg("-drive").arg(format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
                ));
                cmd.arg("-drive").arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    vars.display()
                ));
                boot_disk(&mut cmd, image, "bootindex=0");
            }
            Firmware::Rhf => {
                let Some(fw) = self.firmware_path.clone().or_else(rhf_binary) else {
                    panic!("Firmware::Rhf needs firmware_path or {RHF_ENV}");
                };
                cmd.arg("-kernel").arg(fw);
                // The first device after the host bridge: slot 1.
                boot_disk(&mut cmd, image, "disable-legacy=on");
            }
        }
        // Under firmware QEMU refuses -append itself ("-append only allowed
        // with -kernel option"): not dropped silently.
        if !self.append.is_empty() {
            cmd.args(["-append", &self.append]);
        }
        cmd.args(["-serial", "stdio"]);
        if self.com2 {
            let wait = if self.qmp_wait { "on" } else { "off" };
            cmd.arg("-chardev").arg(format!(
                "socket,id=qmp,path={},server=on,wait={wait}",
                qmp_socket.display()
            ));
            cmd.args(["-device", "isa-serial,chardev=qmp,index=1"]);
        }
        if self.qmp_ports > 0 {
            cmd.args(["-device", "virtio-serial-pci,id=vser0"]);
        }
        for i in 0..self.qmp_ports {
            cmd.arg("-chardev").arg(format!(
                "socket,id=qmpport{i},path={},server=on,wait=off",
                qmp_port_socket(qmp_socket, i).display()
            ));
            cmd.arg("-device").arg(format!(
                "virtserialport,bus=vser0.0,chardev=qmpport{i},name=org.qemu.qmp.{i}"
            ));
        }
        // QEMU's own monitor, beside the appliance's: for `system_powerdown`.
        cmd.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            qemu_monitor_socket(qmp_socket).display()
        ));
        cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        for (i, disk) in self.disks.iter().enumerate() {
            cmd.arg("-drive").arg(format!(
                "file={},if=none,id=disk{i},format=raw,discard=unmap",
                disk.display()
            ));
            cmd.arg("-device")
                .arg(format!("virtio-blk-pci,drive=disk{i},serial=disk{i}"));
        }
        if let Some(port) = self.nbd_port {
            cmd.arg("-netdev").arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{NBD_GUEST_PORT}"
            ));
            cmd.arg("-device")
                .arg(format!("virtio-net-pci,netdev=n0{}", self.net_opts));
        }
        if self.netns_tap.is_some() {
            cmd.arg("-netdev").arg(format!(
                "tap,id=t0,ifname={},script=no,downscript=no",
                NetnsTap::TAP
            ));
            cmd.arg("-device")
                .arg(format!("virtio-net-pci,netdev=t0{}", self.net_opts));
        }
        cmd.args(&self.extra);
        cmd
    }
}

/// The disk image under firmware: virtio-blk, serial `boot`, with `opts`.
fn boot_disk(cmd: &mut Command, image: &Path, opts: &str) {
    cmd.arg("-drive").arg(format!(
        "file={},if=none,id=boot,format={}",
        image.display(),
        image_format(image)
    ));
    cmd.arg("-device").arg(format!(
        "virtio-blk-pci,drive=boot,serial={BOOT_DISK_SERIAL},{opts}"
    ));
}

/// `qcow2` when the file starts with qcow2's magic, else `raw`.
pub fn image_format(path: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"QFI\xfb";
    if is_qcow2 { "qcow2" } else { "raw" }
}

/// A network namespace holding a tap device (`ip netns add`, `ip tuntap
/// add mode tap`; needs root), deleted with everything in it on drop. QEMU
/// started inside it ([`QemuConfig::netns_tap`]) attaches to the tap;
/// the namespace's side is [`NetnsTap::HOST_IP`], the guest is
/// [`NetnsTap::GUEST_IP`] (boot it with `ip=10.0.3.15/24`).
#[derive(Clone, Debug)]
pub struct NetnsTap {
    pub netns: String,
    _owner: std::sync::Arc<NetnsGuard>,
}

#[derive(Debug)]
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

impl NetnsTap {
    pub const TAP: &'static str = "bhtap0";
    pub const HOST_IP: &'static str = "10.0.3.1";
    pub const GUEST_IP: &'static str = "10.0.3.15";
    /// The kernel command-line setting for the guest's address.
    pub const GUEST_IP_SETTING: &'static str = "ip=10.0.3.15/24";

    /// Creates the namespace and its tap; `Err` without root or tun.
    pub fn create() -> Result<NetnsTap, String> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let netns = format!("blockhaus-{}-{n}", std::process::id());
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", &netns])?;
        let me = NetnsTap {
            _owner: std::sync::Arc::new(NetnsGuard(netns.clone())),
            netns,
        };
        let ns = me.netns.as_str();
        let host_cidr = format!("{}/24", Self::HOST_IP);
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "tuntap", "add", "dev", Self::TAP, "mode", "tap"])?;
        ip(&["-n", ns, "addr", "add", &host_cidr, "dev", Self::TAP])?;
        ip(&["-n", ns, "link", "set", Self::TAP, "up"])?;
        // Learn the guest from its gratuitous ARP (Linux ignores unsolicited
        // ARP for unknown neighbours otherwise).
        let _ = me
            .exec("sysctl")
            .args(["-q", &format!("net.ipv4.conf.{}.arp_accept=1", Self::TAP)])
            .status();
        Ok(me)
    }

    /// `program`, run inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, program]);
        c
    }
}

/// The port the appliance's NBD server listens on in the guest.
pub const NBD_GUEST_PORT: u16 = 10809;

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then
/// released), for [`QemuConfig::nbd_port`].
/// `cfg` with QEMU tracing each virtio-blk read request into `trace`
/// (removed first), for [`VirtioBlkReads::from_trace`].
pub fn tracing_reads(cfg: &QemuConfig, trace: &Path) -> QemuConfig {
    let _ = std::fs::remove_file(trace);
    let mut cfg = cfg.clone();
    cfg.extra.push("-trace".into());
    cfg.extra
        .push(format!("enable=virtio_blk_handle_read,file={}", trace.display()).into());
    cfg
}

/// The virtio-blk read requests QEMU traced ([`tracing_reads`]): the same
/// for every run of the same boot, whatever the load on the machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioBlkReads {
    pub requests: usize,
    pub sectors: u64,
    /// The largest request, in sectors.
    pub largest: u64,
}

impl VirtioBlkReads {
    pub fn from_trace(trace: &Path) -> Self {
        let text = std::fs::read_to_string(trace).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("virtio_blk_handle_read"))
            .map(|l| {
                l.rsplit_once("nsectors ")
                    .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .fold(Self::default(), |r, n| Self {
                requests: r.requests + 1,
                sectors: r.sectors + n,
                largest: r.largest.max(n),
            })
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// The socket of virtio-serial QMP port `i` ([`QemuConfig::qmp_ports`]),
/// beside COM2's.
pub fn qmp_port_socket(qmp_socket: &Path, i: usize) -> PathBuf {
    qmp_socket.with_file_name(format!("qmp-port{i}.sock"))
}

/// QEMU's own QMP monitor socket, next to the appliance's COM2 socket.
pub fn qemu_monitor_socket(qmp_socket: &Path) -> PathBuf {
    qmp_socket.with_file_name("qemu-monitor.sock")
}

/// Whether `/dev/kvm` can be opened (it exists but may not work here).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
