//! `cargo xtask fuzz TARGET [--time S]`: coverage-guided fuzzing of the
//! parsers that take outside bytes (`fuzz/fuzz_targets/`), with libFuzzer
//! (crate `libfuzzer-sys`, which builds it from source with the system C++
//! compiler) and LLVM's SanitizerCoverage switched on through stable
//! rustc's `-C passes=sancov-module` and `-C llvm-args`: the flags
//! cargo-fuzz passes, without its nightly-only sanitizer flags.
//!
//! Each target starts from its committed seeds (`fuzz/corpus/TARGET`) and
//! keeps what it finds in `target/fuzz/corpus/TARGET`; crashes land in
//! `target/fuzz/artifacts/TARGET/` (a reproducer: run the target binary on
//! that file). `cargo xtask test` runs every target for a few seconds
//! ([`smoke`]).

use clap::Args;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every target, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "nbd_handshake",
    "nbd_transmission",
    "nbd_client",
    "qmp",
    "qcow2",
    "scsi",
    "virtio_used",
];

/// SanitizerCoverage as cargo-fuzz configures it: 8-bit edge counters,
/// the PC table, and comparison tracing (libFuzzer's value profile and
/// CMP dictionaries), with debug assertions and overflow checks on.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing";

#[derive(Args)]
pub struct FuzzArgs {
    /// The target (`all` for every one, one after the other).
    #[arg(value_parser = target_names())]
    target: String,
    /// Seconds to run (each, with `all`).
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Largest input, in bytes (default: the target's own).
    #[arg(long)]
    max_len: Option<usize>,
}

fn target_names() -> Vec<&'static str> {
    let mut v = TARGETS.to_vec();
    v.push("all");
    v
}

fn root() -> PathBuf {
    harness::workspace_root()
}

/// The host triple: the targets are built with `--target` so the coverage
/// flags reach neither build scripts nor proc macros.
fn host() -> Result<String, String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("rustc -vV: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .ok_or_else(|| "rustc -vV names no host".into())
}

/// Builds every target; returns the directory holding the binaries.
pub fn build() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let host = host()?;
    let target_dir = root().join("target/fuzz");
    eprintln!("xtask: building the fuzz targets (profile fuzz, {host})");
    let status = Command::new(cargo)
        .current_dir(root())
        .args([
            "build",
            "--profile",
            "fuzz",
            "-p",
            "fuzz",
            "--bins",
            "--target",
        ])
        .arg(&host)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the fuzz targets failed ({status})"));
    }
    Ok(target_dir.join(host).join("fuzz"))
}

/// The largest input a target takes by default: qcow2 images need room.
fn default_max_len(target: &str) -> usize {
    match target {
        "qcow2" => 256 << 10,
        "nbd_transmission" => 64 << 10,
        "nbd_client" => 16 << 10,
        _ => 4096,
    }
}

/// What one run did.
pub struct Run {
    pub execs: u64,
    pub corpus: usize,
}

/// Runs `target` for `seconds` from its seeds; fails on a crash, a leak,
/// a timeout or running out of memory (libFuzzer's own verdicts).
pub fn run(bins: &Path, target: &str, seconds: u64, max_len: Option<usize>) -> Result<Run, String> {
    let seeds = root().join("fuzz/corpus").join(target);
    let corpus = root().join("target/fuzz/corpus").join(target);
    let artifacts = root().join("target/fuzz/artifacts").join(target);
    for d in [&corpus, &artifacts] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let bin = bins.join(target);
    // libFuzzer writes what it finds into the first corpus directory and
    // only reads the others: the committed seeds stay as they are.
    let out = Command::new(&bin)
        .arg(&corpus)
        .arg(&seeds)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!(
            "-max_len={}",
            max_len.unwrap_or(default_max_len(target))
        ))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "fuzz target {target} failed ({}); artifacts in {}:\n{}",
            out.status,
            artifacts.display(),
            tail.join("\n")
        ));
    }
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let corpus = std::fs::read_dir(&corpus).map_or(0, |d| d.count());
    Ok(Run {
        execs: stat("stat::number_of_executed_units:"),
        corpus,
    })
}

pub fn fuzz(args: FuzzArgs) -> Result<(), String> {
    let bins = build()?;
    let targets: Vec<&str> = if args.target == "all" {
        TARGETS.to_vec()
    } else {
        vec![args.target.as_str()]
    };
    for t in targets {
        let r = run(&bins, t, args.time.max(1), args.max_len)?;
        println!(
            "{t}: {} execs in {} s, {} inputs in target/fuzz/corpus/{t}",
            r.execs, args.time, r.corpus
        );
    }
    Ok(())
}

/// `cargo xtask test`'s smoke: every target replays its seeds and runs
/// for a few seconds.
pub fn smoke() -> Result<(), String> {
    let bins = build()?;
    for t in TARGETS {
        let r = run(&bins, t, 3, None)?;
        eprintln!("xtask: fuzz smoke {t}: {} execs", r.execs);
    }
    Ok(())
}
