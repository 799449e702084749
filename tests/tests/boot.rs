//! Boot the real image in QEMU (TCG): banner, command line, memory map,
//! clean quit with the halt report and exit 0, and the failure path.

use harness::qemu::FAILURE_EXIT_STATUS;
use harness::{Appliance, Machine, QemuConfig};
use serde_json::Value;
use std::time::Duration;

const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

fn quit_cleanly(mut a: Appliance) -> String {
    let reply = a.qmp().execute("quit", Value::Null).expect("quit reply");
    assert_eq!(reply, serde_json::json!({"return": {}}), "quit reply");
    let status = a.wait_exit(EXIT_TIMEOUT).expect("QEMU exits after quit");
    let console = a.console();
    assert_eq!(
        status.code(),
        Some(0),
        "QEMU exit status after quit; console:\n{console}\nstderr:\n{}",
        a.stderr()
    );
    assert!(
        console.contains("=== blockhaus halt report ==="),
        "halt report missing:\n{console}"
    );
    assert!(
        console.contains("reason: host-qmp-quit"),
        "halt reason missing:\n{console}"
    );
    console
}

#[test]
fn boots_on_every_machine_type_and_quits_with_exit_0() {
    for machine in Machine::ALL {
        let a = Appliance::boot(&QemuConfig::default().machine(machine));
        let console = a.console();
        assert!(
            console.contains(&format!("blockhaus {}", env!("CARGO_PKG_VERSION"))),
            "{}: no banner:\n{console}",
            machine.name()
        );
        assert!(
            console.contains("booted by PVH"),
            "{}: {console}",
            machine.name()
        );
        let console = quit_cleanly(a);
        assert!(
            console.contains("poweroff: ACPI S5"),
            "{}: {console}",
            machine.name()
        );
    }
}

#[test]
fn acpi_power_button_halts_cleanly_on_every_machine_type() {
    for machine in Machine::ALL {
        let mut a = Appliance::boot(&QemuConfig::default().machine(machine));
        let mut qemu = a.qemu_monitor().unwrap();
        qemu.cmd("system_powerdown", Value::Null).unwrap();
        let ev = a
            .qmp()
            .wait_event("SHUTDOWN", Duration::from_secs(20))
            .unwrap();
        assert_eq!(
            ev["data"],
            serde_json::json!({"guest": true, "reason": "guest-shutdown"}),
            "{}",
            machine.name()
        );
        let status = a
            .wait_exit(EXIT_TIMEOUT)
            .expect("QEMU exits after the power button");
        let console = a.console();
        assert_eq!(status.code(), Some(0), "{}: {console}", machine.name());
        assert!(
            console.contains("reason: guest-shutdown (ACPI power button)"),
            "{}: {console}",
            machine.name()
        );
    }
}

#[test]
fn banner_shows_the_parsed_command_line() {
    let a = Appliance::boot(&QemuConfig::default().append("loglevel=debug"));
    a.wait_console("command line: \"loglevel=debug\"", Duration::from_secs(5))
        .unwrap();
    a.wait_console(
        "command line parsed: loglevel=DEBUG",
        Duration::from_secs(5),
    )
    .unwrap();
    quit_cleanly(a);
}

#[test]
fn ram_above_4_gib_is_mapped_and_used() {
    // q35 with 5 GiB: 2 GiB below the PCI hole, 3 GiB above 4 GiB.
    let cfg = QemuConfig {
        memory: "5G".into(),
        ..QemuConfig::default()
    };
    let a = Appliance::boot(&cfg);
    let console = a.console();
    assert!(
        console.contains("in 2 heap regions"),
        "expected two heap regions:\n{console}"
    );
    assert!(
        console.contains("identity map to 7 GiB"),
        "RAM up to 7 GiB must be mapped:\n{console}"
    );
    quit_cleanly(a);
}

fn boot_expecting_failure(append: &str) -> String {
    let image = harness::image::for_tests();
    let mut a =
        Appliance::start(&image, &QemuConfig::default().append(append)).expect("QEMU starts");
    let status = a
        .wait_exit(EXIT_TIMEOUT)
        .expect("QEMU exits on its own after a fatal error");
    let console = a.console();
    assert_eq!(
        status.code(),
        Some(FAILURE_EXIT_STATUS),
        "exit status for {append:?}; console:\n{console}"
    );
    assert!(
        console.contains("reason: guest-panic"),
        "halt report missing:\n{console}"
    );
    console
}

#[test]
fn page_fault_is_reported_with_rip_and_cr2() {
    let console = boot_expecting_failure("blockhaus.test-fault=page-fault");
    assert!(
        console.contains("EXCEPTION: vector 14 (#PF page fault) error code 0x0"),
        "{console}"
    );
    assert!(console.contains("cr2 0x00004000dead0000"), "{console}");
    assert!(
        console.contains("rip 0x00000000001"),
        "RIP inside the image (at 1 MiB):\n{console}"
    );
}

#[test]
fn invalid_opcode_and_divide_error_are_reported() {
    let console = boot_expecting_failure("blockhaus.test-fault=invalid-opcode");
    assert!(
        console.contains("EXCEPTION: vector 6 (#UD invalid opcode)"),
        "{console}"
    );
    let console = boot_expecting_failure("blockhaus.test-fault=divide-by-zero");
    assert!(
        console.contains("EXCEPTION: vector 0 (#DE divide error)"),
        "{console}"
    );
}

#[test]
fn stack_overflow_hits_the_guard_page() {
    let console = boot_expecting_failure("blockhaus.test-fault=stack-overflow");
    assert!(
        console.contains("EXCEPTION: vector 8 (#DF double fault)"),
        "{console}"
    );
    assert!(
        console.contains("the boot stack overflowed into its guard page"),
        "{console}"
    );
}

#[test]
fn panic_is_reported() {
    let console = boot_expecting_failure("blockhaus.test-fault=panic");
    assert!(console.contains("PANIC: panicked at"), "{console}");
    assert!(
        console.contains("test panic requested on the command line"),
        "{console}"
    );
}

#[test]
fn bad_command_line_stops_with_a_clear_error() {
    let console = boot_expecting_failure("bogus=1");
    assert!(
        console.contains("unrecognized kernel command-line item 'bogus=1'"),
        "{console}"
    );
    let console = boot_expecting_failure("blockhaus.test-fault=sideways");
    assert!(
        console.contains("invalid blockhaus.test-fault 'sideways'"),
        "{console}"
    );
}

#[test]
fn boots_under_kvm_when_kvm_works() {
    if !harness::qemu::kvm_usable() {
        eprintln!(
            "boots_under_kvm_when_kvm_works: /dev/kvm cannot be opened here; nothing to check"
        );
        return;
    }
    // Nested KVM here: q35 and pc spend seconds in SeaBIOS, microvm ~0.1 s.
    for machine in Machine::ALL {
        let cfg = QemuConfig {
            accel: harness::Accel::Kvm,
            ..QemuConfig::default().machine(machine)
        };
        let a = Appliance::boot(&cfg);
        assert!(
            a.console().contains("booted by PVH"),
            "{}: {}",
            machine.name(),
            a.console()
        );
        quit_cleanly(a);
    }
}
