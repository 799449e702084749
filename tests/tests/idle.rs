//! An appliance without COM2 (issue 13): a deployment that manages it by
//! boot options alone. No UART answers at COM2's ports (they read 0xFF),
//! so QMP is off; the appliance still serves NBD, idles like any other
//! (the vCPU halts instead of reading 0xFF bytes from a port with nothing
//! behind it) and stops on the ACPI power button through the full halt
//! path.

use std::process::Command;
use std::time::Duration;

use harness::host::{MIB, create, qemu_io, run};
use harness::qemu::free_port;
use harness::{Appliance, QemuConfig};
use serde_json::Value;

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
    // for the 100 Hz tick only (~2 %). The bound is loose so a loaded
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
