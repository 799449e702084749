//! `cargo xtask bench`: measurements, reported side by side with the floor
//! or the stack blockhaus replaces. Never asserted on: this machine is
//! shared and noisy.

use clap::Subcommand;
use harness::{Machine, QemuConfig};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum Which {
    /// QEMU start → QMP greeting, against a do-nothing PVH image's start → exit.
    Boot {
        /// Runs per machine type.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// CPU use of the QEMU process while the appliance sits idle.
    Idle {
        /// Seconds to measure.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// NBD throughput and IOPS: blockhaus next to qemu-nbd and
    /// qemu-storage-daemon on the same image, with the same clients.
    Nbd(crate::bench_nbd::NbdArgs),
    /// Mirror and backup of a 1 GiB image next to qemu-img convert; halt time.
    Jobs(crate::bench_jobs::JobsArgs),
    /// 4 KiB writes into an empty qcow2 image next to qemu-img bench.
    Qcow2(crate::bench_qcow2::Qcow2Args),
}

pub fn bench(which: Which) -> Result<(), String> {
    crate::deps::ensure()?;
    match which {
        Which::Boot { runs } => boot(runs.max(1)),
        Which::Idle { seconds } => idle(seconds.max(1)),
        Which::Nbd(args) => crate::bench_nbd::bench(args),
        Which::Jobs(args) => crate::bench_jobs::bench(args),
        Which::Qcow2(args) => crate::bench_qcow2::bench(args),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn boot(runs: usize) -> Result<(), String> {
    let image = harness::image::build(true)?;
    let size = std::fs::metadata(&image).map_err(|e| e.to_string())?.len();
    let dir = std::env::temp_dir().join(format!("blockhaus-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let floor = dir.join("floor.elf");
    std::fs::write(&floor, crate::floor::image()).map_err(|e| e.to_string())?;

    println!("boot benchmark: {runs} runs per machine, TCG, median wall time");
    println!(
        "image: {} ({size} bytes, {:.1} KiB)",
        image.display(),
        size as f64 / 1024.0
    );
    println!(
        "{:<8} {:>22} {:>26} {:>8}",
        "machine", "blockhaus → greeting", "do-nothing PVH → exit", "ratio"
    );
    for machine in Machine::ALL {
        let cfg = QemuConfig::default().machine(machine);
        let mut ours = Vec::new();
        let mut base = Vec::new();
        for i in 0..runs {
            let sock = dir.join(format!("qmp-{i}.sock"));
            let _ = std::fs::remove_file(&sock);
            // blockhaus: spawn → greeting line on COM2.
            let mut cmd = cfg.command(&image, &sock);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let t0 = Instant::now();
            let mut child = cmd.spawn().map_err(|e| e.to_string())?;
            let mut qmp =
                harness::Qmp::connect(&sock, Duration::from_secs(20)).map_err(|e| e.to_string())?;
            qmp.read_greeting()
                .map_err(|e| format!("{}: {e}", machine.name()))?;
            ours.push(t0.elapsed());
            qmp.negotiate()?;
            let _ = qmp.execute("quit", serde_json::Value::Null);
            let _ = child.wait();

            // The floor: spawn → exit, with the same devices; no QMP client,
            // so QEMU must not wait for one.
            let _ = std::fs::remove_file(&sock);
            let floor_cfg = QemuConfig {
                qmp_wait: false,
                ..cfg.clone()
            };
            let mut cmd = floor_cfg.command(&floor, &sock);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let t0 = Instant::now();
            let status = cmd.status().map_err(|e| e.to_string())?;
            base.push(t0.elapsed());
            if status.code() != Some(1) {
                return Err(format!(
                    "the do-nothing image exited with {status}, expected 1 (isa-debug-exit 0)"
                ));
            }
        }
        let (o, b) = (median(ours), median(base));
        println!(
            "{:<8} {:>19.1} ms {:>23.1} ms {:>7.2}x",
            machine.name(),
            ms(o),
            ms(b),
            o.as_secs_f64() / b.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn idle(seconds: u64) -> Result<(), String> {
    let image = harness::image::build(true)?;
    println!("idle benchmark: QEMU's CPU use over {seconds} s with the appliance idle (TCG)");
    println!("{:<16} {:>14}", "machine", "CPU (% of a core)");
    let mut runs: Vec<(String, QemuConfig)> = Machine::ALL
        .into_iter()
        .map(|m| (m.name().to_string(), QemuConfig::default().machine(m)))
        .collect();
    // Managed by boot options alone: no UART on COM2, so no QMP.
    let no_com2 = QemuConfig {
        com2: false,
        ..QemuConfig::default()
    };
    runs.push(("q35, no COM2".into(), no_com2));
    for (name, cfg) in runs {
        let mut a = harness::Appliance::start(&image, &cfg)?;
        if cfg.com2 {
            a.qmp().negotiate()?;
        } else {
            a.wait_console("ready in", Duration::from_secs(20))?;
        }
        std::thread::sleep(Duration::from_millis(500)); // let boot settle
        let pct = 100.0 * a.cpu_share(Duration::from_secs(seconds))?;
        println!("{name:<16} {pct:>13.2} %");
        if cfg.com2 {
            let _ = a.qmp().execute("quit", serde_json::Value::Null);
        } else {
            a.qemu_monitor()?
                .cmd("system_powerdown", serde_json::Value::Null)?;
        }
        a.wait_exit(Duration::from_secs(10));
    }
    println!("goal: under 2 % of a core");
    Ok(())
}
