//! `cargo xtask soak --count N [--seed S]`: the randomized halt test
//! (`tests/tests/halt_random.rs`) over N seeds in a row, against the
//! release image. Each seed builds a random graph over real images, starts
//! random jobs and writers, halts at a random moment and checks the images
//! on the host (content, `qemu-img check`, and that each persistent dirty
//! bitmap covers every acknowledged write); a failure prints its seed,
//! which `--seed` replays.

use clap::Args;
use std::process::Command;

#[derive(Args)]
pub struct SoakArgs {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    count: u64,
    /// The first seed (the next ones follow it); default: from the clock.
    #[arg(long)]
    seed: Option<u64>,
}

pub fn soak(args: SoakArgs) -> Result<(), String> {
    crate::deps::ensure()?;
    let image = harness::image::build(true)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(harness::workspace_root())
        .args([
            "test",
            "-p",
            "blockhaus-tests",
            "--test",
            "halt_random",
            "--",
            "--nocapture",
        ])
        .env("BLOCKHAUS_IMAGE", &image)
        .env("BLOCKHAUS_SOAK_COUNT", args.count.max(1).to_string());
    match args.seed {
        Some(s) => cmd.env("BLOCKHAUS_SEED", s.to_string()),
        None => cmd.env_remove("BLOCKHAUS_SEED"),
    };
    eprintln!(
        "xtask: soak: {} seed(s) of the randomized halt test",
        args.count.max(1)
    );
    let status = cmd.status().map_err(|e| e.to_string())?;
    if status.success() {
        eprintln!("xtask: soak: {} seed(s) passed", args.count.max(1));
        Ok(())
    } else {
        Err(format!(
            "soak failed ({status}): the failing seed is printed above (replay: cargo xtask soak --count 1 --seed S)"
        ))
    }
}
