//! Idling (issue 13).
//!
//! - Interrupts, not ticks: on every machine type the virtio devices
//!   interrupt through MSI-X, COM2 and the ACPI power button through the
//!   I/O APIC, and an idle appliance halts until one of them or its next
//!   deadline wakes it: counted (`x-blockhaus-interrupts`), it hardly
//!   wakes at all, where a 100 Hz tick wakes it a hundred times a second;
//!   a request after an idle spell is served, woken by the network
//!   device's interrupt, and the power button's interrupt stops it.
//! - An appliance without COM2: a deployment that manages it by boot
//!   options alone. No UART answers at COM2's ports (they read 0xFF), so
//!   QMP is off; the appliance still serves NBD, idles like any other (the
//!   vCPU halts instead of reading 0xFF bytes from a port with nothing
//!   behind it) and stops on the ACPI power button through the full halt
//!   path.

use std::process::Command;
use std::time::Duration;

use harness::host::{MIB, create, qemu_io, run};
use harness::qemu::free_port;
use harness::{Appliance, Machine, QemuConfig};
use serde_json::{Value, json};

const BOOT_OPTIONS: &str = "--blockdev driver=virtio-blk,node-name=d0,serial=disk0 \
    --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
    --export type=nbd,id=e0,node-name=d0,name=disk0,writable=on";

fn nbd_client(a: &Appliance, port: u16, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(format!("nbd://127.0.0.1:{port}/disk0"));
    let out = cmd.output().expect("qemu-io runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}:\n{text}\nconsole:\n{}",
        a.console()
    );
    text
}

#[test]
fn without_com2_the_appliance_serves_idles_and_stops_on_the_power_button() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.raw");
    create(&img, 64 * MIB);
    qemu_io(&img, &["write -P 0x5c 0 1M".into()]);
    let port = free_port();
    let cfg = QemuConfig {
        com2: false,
        append: BOOT_OPTIONS.into(),
        disks: vec![img.clone()],
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    let mut a = Appliance::start(&harness::image::for_tests(), &cfg).unwrap();
    a.wait_console("ready in", Duration::from_secs(30)).unwrap();

    // Served by boot options alone.
    nbd_client(&a, port, &["read -P 0x5c 0 1M", "write -P 0xa7 1M 1M"]);
    run(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/disk0")));

    // Idle: a vCPU spinning on COM2's 0xFF takes all the host CPU it is
    // given (a whole core when the host is quiet); a halting one wakes
    // for its deadlines only. The bound is loose so a loaded
    // host cannot make it flake.
    std::thread::sleep(Duration::from_millis(500));
    let share = a.cpu_share(Duration::from_secs(4)).unwrap();
    eprintln!("idle without COM2: {:.1} % of a core", share * 100.0);
    assert!(
        share < 0.4,
        "idle without COM2, QEMU used {:.0} % of a core\nconsole:\n{}",
        share * 100.0,
        a.console()
    );

    let console = a.console();
    assert!(
        console.contains("no UART on COM2: QMP is off") && console.contains("QMP off"),
        "the console must say QMP is off:\n{console}"
    );
    assert!(
        console.contains("--export type=nbd,id=e0,node-name=d0,name=disk0,writable=on: applied"),
        "{console}"
    );

    // The power button runs the whole halt path: export closed, node
    // closed, device flushed, ACPI poweroff, exit 0.
    a.qemu_monitor()
        .unwrap()
        .cmd("system_powerdown", Value::Null)
        .unwrap();
    let status = a
        .wait_exit(Duration::from_secs(30))
        .expect("QEMU exits after the power button");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
    for needle in [
        "exports closed: e0",
        "all 1 nodes closed",
        "device 'disk0': flushed",
        "reason: guest-shutdown (ACPI power button)",
        "poweroff: ACPI S5",
    ] {
        assert!(console.contains(needle), "no {needle:?} in:\n{console}");
    }
    // What the client wrote is on the host image.
    qemu_io(
        &img,
        &["read -P 0x5c 0 1M".into(), "read -P 0xa7 1M 1M".into()],
    );
}

/// Halts and interrupts since boot, from `x-blockhaus-interrupts`.
fn interrupt_counts(a: &mut Appliance) -> Value {
    a.qmp()
        .cmd("x-blockhaus-interrupts", json!({}))
        .unwrap_or_else(|e| panic!("x-blockhaus-interrupts: {e}\nconsole:\n{}", a.console()))
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Idle seconds counted per machine type.
const IDLE: Duration = Duration::from_secs(3);
/// Most wake-ups an idle second may take: nothing is due while idle, and
/// the QMP exchanges that count them add a few. A 100 Hz tick takes a
/// hundred, polling the power button ten times a second takes ten.
const MAX_WAKEUPS_PER_SECOND: u64 = 3;

#[test]
fn idle_appliance_wakes_on_interrupts_not_on_a_tick_on_every_machine_type() {
    for machine in Machine::ALL {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk0.raw");
        create(&img, 64 * MIB);
        qemu_io(&img, &["write -P 0x3e 0 1M".into()]);
        let port = free_port();
        let cfg = QemuConfig {
            append: format!("{BOOT_OPTIONS} blockhaus.debug-commands=on"),
            disks: vec![img.clone()],
            nbd_port: Some(port),
            ..QemuConfig::default().machine(machine)
        };
        let mut a = Appliance::boot(&cfg);
        let name = machine.name();
        let console = a.console();
        // The disk and the network device each got MSI-X; nothing is
        // polled on a timer.
        assert_eq!(
            console.matches("MSI-X on").count(),
            2,
            "{name}: MSI-X for virtio-blk and virtio-net:\n{console}"
        );
        assert!(
            !console.contains("no interrupt, polled"),
            "{name}: {console}"
        );

        // Idle: count the wake-ups.
        std::thread::sleep(Duration::from_millis(500));
        let before = interrupt_counts(&mut a);
        assert_eq!(before["polled"], json!(false), "{name}: {before}");
        std::thread::sleep(IDLE);
        let after = interrupt_counts(&mut a);
        let halts = count(&after, "halts") - count(&before, "halts");
        let timer = count(&after, "timer") - count(&before, "timer");
        eprintln!("{name}: {halts} halts, {timer} timer interrupts in {IDLE:?} idle; {after}");
        assert!(
            halts > 0 && halts <= MAX_WAKEUPS_PER_SECOND * IDLE.as_secs(),
            "{name}: {halts} halts in {IDLE:?} of idle ({before} -> {after})\nconsole:\n{}",
            a.console()
        );
        assert!(
            timer <= MAX_WAKEUPS_PER_SECOND * IDLE.as_secs(),
            "{name}: {timer} timer interrupts in {IDLE:?} of idle"
        );
        // The QMP commands themselves arrived by COM2's interrupt.
        assert!(
            count(&after, "uart") > count(&before, "uart"),
            "{name}: QMP input woke the CPU without COM2's interrupt: {before} -> {after}"
        );

        // A request after an idle spell (past the 20 ms of busy polling
        // that follow any activity, so the CPU is halted when it comes):
        // served and correct, and the network device's interrupt woke the
        // halted CPU for it.
        std::thread::sleep(Duration::from_millis(300));
        let net_before = count(&after, "net");
        nbd_client(&a, port, &["read -P 0x3e 0 1M", "write -P 0x81 1M 64k"]);
        nbd_client(&a, port, &["read -P 0x81 1M 64k", "read -P 0x3e 0 1M"]);
        let end = interrupt_counts(&mut a);
        assert!(
            count(&end, "net") > net_before,
            "{name}: no device interrupt for the NBD requests: {after} -> {end}"
        );

        // The power button: its interrupt (not a poll) starts the halt.
        std::thread::sleep(Duration::from_millis(300));
        a.qemu_monitor()
            .unwrap()
            .cmd("system_powerdown", Value::Null)
            .unwrap();
        let status = a.wait_exit(Duration::from_secs(30));
        let console = a.console();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{name}: console:\n{console}"
        );
        assert!(
            console.contains("reason: guest-shutdown (ACPI power button)"),
            "{name}: {console}"
        );
        let sci: u64 = console
            .split_once(", SCI ")
            .and_then(|(_, rest)| rest.split([',', '\n']).next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name}: no SCI count in the halt report:\n{console}"));
        assert!(
            sci >= 1,
            "{name}: the power button did not interrupt:\n{console}"
        );
        qemu_io(&img, &["read -P 0x81 1M 64k".into()]);
    }
}

/// Boots with one 64 MiB virtio-blk disk (serial disk0, its first MiB
/// filled with `pattern`) added by hand, so the test can give the drive
/// and the device options of its own (`drive_opts`, `device_opts`: each
/// empty or starting with a comma), and
/// with the boot options' NBD export of it and the debug commands.
fn boot_with_one_disk(
    pattern: u8,
    drive_opts: &str,
    device_opts: &str,
) -> (tempfile::TempDir, std::path::PathBuf, u16, Appliance) {
    boot_on(Machine::Q35, pattern, drive_opts, device_opts)
}

fn boot_on(
    machine: Machine,
    pattern: u8,
    drive_opts: &str,
    device_opts: &str,
) -> (tempfile::TempDir, std::path::PathBuf, u16, Appliance) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.raw");
    create(&img, 64 * MIB);
    qemu_io(&img, &[format!("write -P {pattern:#x} 0 1M")]);
    let port = free_port();
    let cfg = QemuConfig {
        append: format!("{BOOT_OPTIONS} blockhaus.debug-commands=on"),
        nbd_port: Some(port),
        extra: vec![
            "-drive".into(),
            format!(
                "file={},if=none,id=d0,format=raw{drive_opts}",
                img.display()
            )
            .into(),
            "-device".into(),
            format!("virtio-blk-pci,drive=d0,serial=disk0{device_opts}").into(),
        ],
        ..QemuConfig::default().machine(machine)
    };
    let a = Appliance::boot(&cfg);
    (dir, img, port, a)
}

/// A virtio device without MSI-X (`vectors=0`) interrupts through INTx,
/// on the ISA IRQ the firmware gave it, on both PC chipsets: throttled
/// reads (one request a second on the host side) complete while the CPU
/// is halted, and INTx wakes it for them (counted); nothing is polled on a
/// timer; what was written is on the disk after quit.
#[test]
fn a_device_without_msix_wakes_the_cpu_through_intx() {
    for machine in [Machine::Q35, Machine::Pc] {
        let (_dir, img, port, mut a) =
            boot_on(machine, 0x6d, ",throttling.iops-total=1", ",vectors=0");
        let console = a.console();
        assert!(
            console.contains(": no MSI-X: INTx on IRQ "),
            "{machine:?}:\n{console}"
        );
        assert_eq!(
            console.matches("MSI-X on").count(),
            1,
            "the network device still has MSI-X:\n{console}"
        );
        // The debug command is in the schema, as every command is.
        let schema = a.qmp().cmd("query-qmp-schema", json!({})).unwrap();
        assert!(
            schema.as_array().is_some_and(|s| s.iter().any(|e| {
                e["name"] == json!("x-blockhaus-interrupts") && e["meta-type"] == json!("command")
            })),
            "x-blockhaus-interrupts not in query-qmp-schema"
        );
        std::thread::sleep(Duration::from_millis(500));
        let before = interrupt_counts(&mut a);
        nbd_client(
            &a,
            port,
            &[
                "read -P 0x6d 0 4k",
                "read -P 0x6d 64k 4k",
                "write -P 0x19 1M 4k",
                "read -P 0x19 1M 4k",
            ],
        );
        let after = interrupt_counts(&mut a);
        assert!(
            count(&after, "intx") > count(&before, "intx"),
            "{machine:?}: no INTx woke the CPU for throttled requests: {before} -> {after}\nconsole:\n{}",
            a.console()
        );
        assert_eq!(after["polled"], json!(false), "{after}");
        a.quit();
        qemu_io(&img, &["read -P 0x19 1M 4k".into()]);
    }
}

/// On microvm no firmware gives the function an Interrupt Line (the
/// appliance places its BARs itself): without MSI-X and without a line it
/// says so, polls the device on a timer while idle, and serves it.
#[test]
fn without_msix_or_an_intx_line_a_device_is_polled_and_served() {
    let (_dir, img, port, mut a) = boot_on(Machine::Microvm, 0x6d, "", ",vectors=0");
    let console = a.console();
    assert!(
        console.contains(
            "(no MSI-X, no usable INTx line): no interrupt, polled every 10 ms while idle"
        ),
        "{console}"
    );
    assert_eq!(interrupt_counts(&mut a)["polled"], json!(true));
    std::thread::sleep(Duration::from_millis(500));
    nbd_client(&a, port, &["read -P 0x6d 0 1M", "write -P 0x19 1M 1M"]);
    std::thread::sleep(Duration::from_millis(300));
    nbd_client(&a, port, &["read -P 0x19 1M 1M"]);
    a.quit();
    qemu_io(&img, &["read -P 0x19 1M 1M".into()]);
}

/// A disk request still in flight when the busy polling ends: QEMU's own
/// throttling (one request a second on the host side) holds each read
/// back, so the appliance halts with requests in flight and nothing due.
/// The disk's MSI-X interrupt wakes it for each completion (counted), and
/// the reads come back right.
#[test]
fn a_disk_completion_wakes_the_halted_cpu() {
    let (_dir, _img, port, mut a) = boot_with_one_disk(0x2b, ",throttling.iops-total=1", "");
    std::thread::sleep(Duration::from_millis(500));
    let before = interrupt_counts(&mut a);
    nbd_client(
        &a,
        port,
        &[
            "read -P 0x2b 0 4k",
            "read -P 0x2b 64k 4k",
            "read -P 0x2b 512k 4k",
        ],
    );
    let after = interrupt_counts(&mut a);
    assert!(
        count(&after, "disk") > count(&before, "disk"),
        "no disk interrupt woke the CPU for throttled reads: {before} -> {after}\nconsole:\n{}",
        a.console()
    );
    assert_eq!(after["polled"], json!(false), "{after}");
    a.quit();
}

/// QMP on a virtio-serial port, no COM2: the port's queues interrupt
/// (MSI-X), so commands sent to an idle appliance wake it (counted) and
/// nothing is polled on a timer.
#[test]
fn a_qmp_port_wakes_the_idle_cpu() {
    let mut a = Appliance::start(
        &harness::image::for_tests(),
        &QemuConfig {
            com2: false,
            qmp_ports: 1,
            append: "blockhaus.debug-commands=on".into(),
            ..QemuConfig::default()
        },
    )
    .unwrap();
    let mut q = harness::qmp::Qmp::connect(&a.qmp_port_socket(0), Duration::from_secs(20)).unwrap();
    q.negotiate().unwrap();
    let console = a.console();
    assert!(console.contains("MSI-X on"), "{console}");
    assert!(!console.contains("no interrupt, polled"), "{console}");
    std::thread::sleep(Duration::from_millis(500));
    let before = q.cmd("x-blockhaus-interrupts", json!({})).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let after = q.cmd("x-blockhaus-interrupts", json!({})).unwrap();
    assert_eq!(after["polled"], json!(false), "{after}");
    assert!(
        count(&after, "console") > count(&before, "console"),
        "the port's command did not wake the CPU by interrupt: {before} -> {after}"
    );
    assert!(
        count(&after, "halts") - count(&before, "halts") <= 2 * MAX_WAKEUPS_PER_SECOND,
        "{before} -> {after}"
    );
    q.cmd("quit", Value::Null).unwrap();
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    assert_eq!(status.code(), Some(0), "{}", a.console());
}
