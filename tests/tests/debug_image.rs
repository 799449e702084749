//! The debug image (`cargo xtask run --debug`) boots with a disk and
//! virtio-net, serves NBD and quits cleanly (issue 13). An unoptimised
//! build keeps every temporary copy of a value in its own stack slot, so
//! the virtqueues that virtio-drivers builds by value (the shadow
//! descriptor and indirect-list tables inline) once overflowed the boot
//! stack into its guard page as soon as a virtio-net device was present.
//! Disk queues of 1024 entries, the largest the drivers take, make the
//! deepest frames; the halt report's stack line must keep a margin.

use std::process::Command;

use harness::host::{MIB, create, qemu_io};
use harness::qemu::free_port;
use harness::{Appliance, QemuConfig};

/// The most of the boot stack the debug image may use at its deepest:
/// three quarters, so a change that brings it near the guard page fails
/// here rather than as a double fault.
const STACK_MARGIN_KIB: u64 = 512 * 3 / 4;

/// `boot stack: N KiB of M KiB used at the deepest` → (N, M).
fn stack_line(console: &str) -> Option<(u64, u64)> {
    let rest = console
        .lines()
        .find_map(|l| l.strip_prefix("boot stack: "))?;
    let mut words = rest.split_whitespace();
    let used = words.next()?.parse().ok()?;
    let size = words.nth(2)?.parse().ok()?;
    Some((used, size))
}

#[test]
fn the_debug_image_boots_with_disk_and_net_serves_nbd_and_quits() {
    let image = harness::image::build(false).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk0.raw");
    create(&img, 16 * MIB);
    qemu_io(&img, &["write -P 0x3d 0 64k".into()]);
    let port = free_port();
    let cfg = QemuConfig {
        append: "--blockdev driver=virtio-blk,node-name=d0,serial=disk0 \
            --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
            --export type=nbd,id=e0,node-name=d0,name=disk0"
            .into(),
        disks: vec![img],
        nbd_port: Some(port),
        extra: ["-global", "virtio-blk-pci.queue-size=1024"]
            .map(Into::into)
            .into(),
        ..QemuConfig::default()
    };
    let mut a = Appliance::start(&image, &cfg).unwrap_or_else(|e| panic!("{e}"));
    a.qmp()
        .negotiate()
        .unwrap_or_else(|e| panic!("QMP negotiation: {e}\nconsole:\n{}", a.console()));
    let console = a.console();
    assert!(console.contains("queue 1024"), "{console}");
    assert!(console.contains("virtio-net: MAC"), "{console}");

    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x3d 0 64k"])
        .arg(format!("nbd://127.0.0.1:{port}/disk0"))
        .output()
        .expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("fail"),
        "qemu-io over NBD:\n{text}\nconsole:\n{}",
        a.console()
    );

    let console = a.quit();
    let (used, size) =
        stack_line(&console).unwrap_or_else(|| panic!("no boot stack line:\n{console}"));
    eprintln!("debug image: boot stack {used} KiB of {size} KiB at the deepest");
    assert_eq!(size, 512, "{console}");
    assert!(
        used <= STACK_MARGIN_KIB,
        "the debug image used {used} KiB of its {size} KiB boot stack:\n{console}"
    );
}

#[test]
fn the_stack_line_parses() {
    assert_eq!(
        stack_line("x\nboot stack: 214 KiB of 512 KiB used at the deepest\n"),
        Some((214, 512))
    );
    assert_eq!(stack_line("heap: 1 KiB used"), None);
}
