//! QMP on virtio-serial ports (`virtserialport,name=org.qemu.qmp.N`, each
//! on its own socket with `wait=off`): every connection gets its own
//! greeting and negotiation, a disconnect drops the session (a
//! half-received command included), several ports are independent
//! monitors, and events reach every negotiated client. Checked with
//! QEMU's own Python client (`qemu.qmp`), `qmp-shell`, `socat`, and raw
//! sockets; COM2 keeps serving beside the ports.

use harness::{Appliance, QemuConfig, Qmp};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn boot(ports: usize) -> Appliance {
    Appliance::boot(&QemuConfig {
        qmp_ports: ports,
        ..QemuConfig::default()
    })
}

/// A raw client on `path`, its greeting read.
fn connect(path: &Path) -> Qmp {
    let mut q = Qmp::connect(path, Duration::from_secs(20)).expect("port socket");
    let greeting = q.read_greeting().expect("a greeting on connect");
    assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 7, "{greeting}");
    q
}

const CLIENTS: &str = r#"
import asyncio, json, sys
from qemu.qmp import QMPClient, EventListener

async def connect(path, name):
    c = QMPClient(name)
    await asyncio.wait_for(c.connect(path), 60)
    return c

async def until(listener, name):
    seen = []
    while True:
        e = await asyncio.wait_for(listener.get(), 60)
        data = e.get('data', {})
        seen.append(e['event'] + ':' + str(data.get('status', data.get('device', ''))))
        if e['event'] == name:
            return seen

async def main(p0, p1):
    out = {'reconnects': []}
    # Connect, run a command, disconnect: every time a new greeting and
    # negotiation (QMPClient waits for both).
    for i in range(3):
        c = await connect(p0, 'again%d' % i)
        out['reconnects'].append((await c.execute('query-version'))['qemu'])
        await c.disconnect()
    a = await connect(p0, 'a')
    b = await connect(p1, 'b')
    la = EventListener(('JOB_STATUS_CHANGE', 'BLOCK_JOB_COMPLETED'))
    lb = EventListener(('JOB_STATUS_CHANGE', 'BLOCK_JOB_COMPLETED', 'SHUTDOWN'))
    a.register_listener(la)
    b.register_listener(lb)
    for n in ('src', 'tgt'):
        await a.execute('blockdev-add', {'driver': 'null-co', 'node-name': n, 'size': 1048576})
    await a.execute('blockdev-backup',
                    {'job-id': 'j0', 'device': 'src', 'target': 'tgt', 'sync': 'full'})
    out['a'] = await until(la, 'BLOCK_JOB_COMPLETED')
    out['b'] = await until(lb, 'BLOCK_JOB_COMPLETED')
    # Both ports serve at once: b runs a command while a is connected.
    out['b_nodes'] = sorted(n['node-name'] for n in await b.execute('query-named-block-nodes'))
    try:
        await a.execute('quit')
    except Exception:
        pass
    out['b_shutdown'] = (await until(lb, 'SHUTDOWN'))[-1]
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

#[test]
fn qemu_qmp_reconnects_and_two_ports_serve_at_once_with_events_to_both() {
    let mut a = boot(2);
    let out = Command::new("/usr/bin/python3")
        .args(["-c", CLIENTS])
        .arg(a.qmp_port_socket(0))
        .arg(a.qmp_port_socket(1))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "client failed: {}\nconsole:\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.console()
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("the client's JSON");
    assert_eq!(r["reconnects"].as_array().unwrap().len(), 3, "{r}");
    // JOB_STATUS_CHANGE 'created' is raised inside a's command (a writes
    // it before the reply; b gets it from the monitor), BLOCK_JOB_COMPLETED
    // from the main loop: both clients see the same events in order.
    assert_eq!(r["a"], r["b"], "{r}");
    let events: Vec<&str> = r["a"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"JOB_STATUS_CHANGE:created"), "{r}");
    assert_eq!(events.last(), Some(&"BLOCK_JOB_COMPLETED:j0"), "{r}");
    assert_eq!(r["b_nodes"], json!(["src", "tgt"]), "{r}");
    assert_eq!(r["b_shutdown"], "SHUTDOWN:", "{r}");
    // COM2's client, negotiated at boot, got them too.
    let com2 = a.qmp();
    com2.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(30))
        .expect("COM2 sees the job's events");
    let shutdown = com2
        .wait_event("SHUTDOWN", Duration::from_secs(30))
        .expect("COM2 sees SHUTDOWN");
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit", "{shutdown}");
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    assert!(status.success(), "{status:?}\n{}", a.console());
}

#[test]
fn a_client_that_vanishes_mid_command_leaves_the_next_a_fresh_session() {
    let mut a = boot(1);
    let port = a.qmp_port_socket(0);
    let mut first = connect(&port);
    first.negotiate().unwrap();
    first
        .send_raw(br#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "#)
        .unwrap();
    drop(first);
    // A new greeting; negotiation is to be done again, and the half
    // command is gone: the next request parses on its own.
    let mut second = connect(&port);
    let refused = second
        .request(&json!({"execute": "query-version"}))
        .unwrap();
    assert_eq!(refused["error"]["class"], "CommandNotFound", "{refused}");
    assert_eq!(
        refused["error"]["desc"], "Expecting capabilities negotiation with 'qmp_capabilities'",
        "{refused}"
    );
    second.negotiate().unwrap();
    let nodes = second.cmd("query-named-block-nodes", json!({})).unwrap();
    assert_eq!(nodes, json!([]), "the half blockdev-add ran: {nodes}");
    // Gone while the reply is on its way: the appliance keeps serving,
    // and the next client gets its greeting first, not that reply.
    second
        .send_raw(b"{\"execute\": \"query-qmp-schema\"}\n")
        .unwrap();
    drop(second);
    let mut third = connect(&port);
    third.negotiate().unwrap();
    assert_eq!(
        third.cmd("query-version", json!({})).unwrap()["qemu"]["major"],
        7
    );
    // COM2 is untouched by all this.
    assert_eq!(
        a.qmp().cmd("query-version", json!({})).unwrap()["qemu"]["major"],
        7
    );
    drop(third);
    a.quit();
}

#[test]
fn qmp_shell_and_socat_talk_to_a_port() {
    let a = boot(1);
    let port = a.qmp_port_socket(0);
    // qmp-shell negotiates itself and prints QEMU's error texts.
    let mut script = tempfile::NamedTempFile::new().unwrap();
    script
        .write_all(b"query-version\nblock-latency-histogram-set id=nope\n")
        .unwrap();
    let out = Command::new("qmp-shell")
        .arg(&port)
        .stdin(std::fs::File::open(script.path()).unwrap())
        .output()
        .expect("qmp-shell runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Connected to QEMU 7.2.0"), "{text}");
    assert!(
        text.contains(
            r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}}"#
        ),
        "{text}"
    );
    // socat sends without waiting for the greeting; the session exists
    // from the connect on, so nothing is lost. (Its input stays open until
    // the replies are in: QEMU's socket chardev treats a half-close as the
    // client going away.)
    let mut socat = Command::new("socat")
        .args(["-", &format!("UNIX-CONNECT:{}", port.display())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("socat runs");
    let mut input = socat.stdin.take().unwrap();
    input
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-version\"}\n")
        .unwrap();
    let mut output = std::io::BufReader::new(socat.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut output, &mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        lines.push(v);
    }
    drop(input);
    socat.wait().unwrap();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0]["QMP"].is_object(), "{lines:?}");
    assert_eq!(lines[1], json!({"return": {}}), "{lines:?}");
    assert_eq!(lines[2]["return"]["qemu"]["major"], 7, "{lines:?}");
    a.quit();
}

/// The configuration `cargo xtask run` uses: no COM2, QMP on a port only.
/// A connected, negotiated client and an unconnected port leave the vCPU
/// halting between ticks (ports are polled from the used rings, which
/// costs no VM exit): the loose bound only catches a spinning main loop,
/// as in `idle.rs`. `quit` on the port runs the halt path, whose
/// `SHUTDOWN` reaches the client.
#[test]
fn without_com2_a_port_serves_idles_and_quits() {
    let mut a = Appliance::start(
        &harness::image::for_tests(),
        &QemuConfig {
            com2: false,
            qmp_ports: 2,
            ..QemuConfig::default()
        },
    )
    .unwrap();
    let mut q = connect(&a.qmp_port_socket(0));
    q.negotiate().unwrap();
    assert!(
        a.console().contains("QMP on virtio-serial"),
        "{}",
        a.console()
    );
    std::thread::sleep(Duration::from_millis(500));
    let share = a.cpu_share(Duration::from_secs(4)).unwrap();
    eprintln!(
        "idle with virtio-serial QMP: {:.1} % of a core",
        share * 100.0
    );
    assert!(
        share < 0.4,
        "idle with virtio-serial QMP, QEMU used {:.0} % of a core\nconsole:\n{}",
        share * 100.0,
        a.console()
    );
    q.cmd("quit", Value::Null).unwrap();
    let shutdown = q.wait_event("SHUTDOWN", Duration::from_secs(30)).unwrap();
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit", "{shutdown}");
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    assert_eq!(status.code(), Some(0), "{}", a.console());
}

/// Under OVMF (the bootable disk image, `cargo xtask run --image`): the
/// firmware writes its console to COM1 and COM2, not to the port, so a
/// client on the port sees the greeting first and nothing before it.
#[test]
fn under_ovmf_the_port_carries_qmp_only() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = harness::image::for_tests();
    let loader = harness::esp::build_loader(&kernel).unwrap_or_else(|e| panic!("{e}"));
    let img = dir.path().join("blockhaus.img");
    harness::esp::write_disk(&img, &loader, Some(b"loglevel=info\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut a = Appliance::start(
        &img,
        &QemuConfig {
            firmware: harness::qemu::Firmware::Ovmf,
            com2: false,
            qmp_ports: 1,
            ..QemuConfig::default()
        },
    )
    .unwrap();
    let mut q = Qmp::connect(&a.qmp_port_socket(0), Duration::from_secs(20)).unwrap();
    q.set_timeout(Duration::from_secs(120)).unwrap();
    let greeting = q.recv().expect("the first line on the port");
    assert!(greeting["QMP"].is_object(), "{greeting}");
    q.greeting = Some(greeting);
    q.negotiate().unwrap();
    assert_eq!(
        q.cmd("query-version", json!({})).unwrap()["qemu"]["major"],
        7
    );
    q.cmd("quit", Value::Null).unwrap();
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    assert_eq!(status.code(), Some(0), "{}", a.console());
}

/// A fatal error inside a command run from a port: the halt path runs
/// from inside the port's poll, and every negotiated client (the one whose
/// command panicked, another port's, COM2's) gets `GUEST_PANICKED` then
/// `SHUTDOWN`; QEMU exits with the failure status.
#[test]
fn a_panic_in_a_ports_command_reaches_every_client() {
    let mut a = Appliance::boot(&QemuConfig {
        qmp_ports: 2,
        append: "blockhaus.test-fault=panic-on-qmp".into(),
        ..QemuConfig::default()
    });
    let mut p0 = connect(&a.qmp_port_socket(0));
    p0.negotiate().unwrap();
    let mut p1 = connect(&a.qmp_port_socket(1));
    p1.negotiate().unwrap();
    // No reply: the command never returns.
    p0.send_raw(b"{\"execute\": \"x-blockhaus-panic\"}\n")
        .unwrap();
    for (who, q) in [("port 0", &mut p0), ("port 1", &mut p1), ("COM2", a.qmp())] {
        let panicked = q
            .wait_event("GUEST_PANICKED", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(panicked["data"]["action"], "poweroff", "{who}");
        let shutdown = q
            .wait_event("SHUTDOWN", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(shutdown["data"]["reason"], "guest-panic", "{who}");
    }
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    assert_eq!(
        status.code(),
        Some(harness::qemu::FAILURE_EXIT_STATUS),
        "{}",
        a.console()
    );
}

/// Clients that send many requests and read nothing: each gets every
/// reply, in order, once it reads (the appliance stops taking a client's
/// input while its unread output is high, as a socket's flow control
/// would, instead of dropping replies). Four such clients at `-m 24M`
/// (a 20 MiB heap) with ~8 MiB of replies each: the appliance keeps
/// serving COM2 meanwhile, nothing panics, and it quits cleanly.
#[test]
fn clients_that_do_not_read_lose_no_reply_and_do_not_exhaust_the_heap() {
    use std::io::{BufRead, BufReader};
    const PORTS: usize = 4;
    let mut a = Appliance::boot(&QemuConfig {
        qmp_ports: PORTS,
        memory: "24M".into(),
        ..QemuConfig::default()
    });
    // How big one reply is, from COM2.
    let schema = a
        .qmp()
        .cmd("query-qmp-schema", json!({}))
        .expect("query-qmp-schema");
    let reply_bytes = schema.to_string().len();
    let requests = (8 << 20) / reply_bytes + 1;
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for i in 0..PORTS {
        let s = harness::qmp::connect_retry(&a.qmp_port_socket(i), Duration::from_secs(20))
            .expect("port socket");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut greeting = String::new();
        r.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("\"QMP\""), "{greeting}");
        // The writer blocks once the appliance stops taking input.
        writers.push(std::thread::spawn(move || {
            w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
            for id in 0..requests {
                w.write_all(
                    format!("{{\"execute\": \"query-qmp-schema\", \"id\": {id}}}\n").as_bytes(),
                )?;
            }
            Ok::<_, std::io::Error>(w)
        }));
        readers.push(r);
    }
    // Let the output pile up, then check COM2 is still served.
    std::thread::sleep(Duration::from_secs(5));
    let v = a
        .qmp()
        .cmd("query-version", json!({}))
        .expect("COM2 serves");
    assert_eq!(v["qemu"]["major"], 7);
    for (i, mut r) in readers.into_iter().enumerate() {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "{\"return\": {}}", "port {i}: negotiation");
        for id in 0..requests {
            line.clear();
            let n = r.read_line(&mut line).unwrap_or_else(|e| {
                panic!(
                    "port {i}: reply {id} of {requests}: {e}\nconsole:\n{}",
                    a.console()
                )
            });
            assert!(n > 0, "port {i}: closed at reply {id}");
            let reply: Value = serde_json::from_str(&line).expect("JSON");
            assert_eq!(reply["id"], id, "port {i}: replies in order, none lost");
            assert!(reply["return"].is_array(), "port {i}: {line:.200}");
        }
    }
    for w in writers {
        w.join().unwrap().expect("writer");
    }
    let console = a.quit();
    assert!(!console.contains("PANIC"), "{console}");
}

/// The same on COM2: a client that sends more requests than it reads
/// replies to (~5 MiB of them, more than the appliance would hold) gets
/// every one, in order; the unread bytes wait in the UART meanwhile.
#[test]
fn a_com2_client_that_does_not_read_loses_no_reply() {
    let mut a = boot(0);
    let q = a.qmp();
    let schema = q.cmd("query-qmp-schema", json!({})).expect("schema");
    let requests = (5 << 20) / schema.to_string().len() + 1;
    let input: String = (0..requests)
        .map(|id| format!("{{\"execute\": \"query-qmp-schema\", \"id\": {id}}}\n"))
        .collect();
    q.send_raw(input.as_bytes()).expect("requests");
    std::thread::sleep(Duration::from_secs(3));
    q.set_timeout(Duration::from_secs(120)).unwrap();
    for id in 0..requests {
        let reply = q
            .recv_reply()
            .unwrap_or_else(|e| panic!("reply {id} of {requests}: {e}"));
        assert_eq!(reply["id"], id, "replies in order, none lost");
        assert_eq!(reply["return"], schema, "reply {id}");
    }
    a.quit();
}
