//! `cargo xtask`: the developer's and the user's front door.
//!
//! - `build [--release]`: the bootable image.
//! - `image [--config FILE] [--format raw|qcow2] [-o PATH]`: the bootable
//!   GPT disk image with its configuration file.
//! - `run`: boots the appliance in QEMU with a default disk and QMP on a
//!   socket, and says how to connect.
//! - `test`: formatting, clippy, host unit tests, the fuzz smoke, then the
//!   QEMU tests.
//! - `fuzz TARGET [--time S]`: coverage-guided fuzzing (libFuzzer).
//! - `graph`: the live block graph as Graphviz.
//! - `top [--once] [--json]`: a live view of exports, nodes and jobs.
//! - `bench boot|idle|nbd|jobs|qcow2|migrate`: boot time against a
//!   do-nothing PVH image; idle CPU; NBD against qemu-nbd and
//!   qemu-storage-daemon; block jobs; qcow2 writes; migration between
//!   appliances and the NBD client node next to QEMU's tools.

mod bench;
mod bench_jobs;
mod bench_migrate;
mod bench_nbd;
mod bench_qcow2;
mod deps;
mod floor;
mod fuzz;
mod graph;
mod image;
mod linux_anchor;
mod run;
mod soak;
mod test;
mod top;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and benchmark blockhaus"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the bootable image (target/image/x86_64-unknown-none/<profile>/blockhaus).
    Build {
        /// Optimised build (what `run`, `test` and `bench` boot).
        #[arg(long)]
        release: bool,
    },
    /// Write the bootable disk image (GPT + ESP; target/blockhaus.img).
    Image(image::ImageArgs),
    /// Boot the appliance in QEMU: console here, QMP on a socket.
    Run(run::RunArgs),
    /// Run every test: fmt, clippy, host unit tests, QEMU integration tests.
    Test(test::TestArgs),
    /// Coverage-guided fuzzing of one target (libFuzzer; `all` for every one).
    Fuzz(fuzz::FuzzArgs),
    /// Draw the live block graph of a running appliance (Graphviz).
    Graph(graph::GraphArgs),
    /// A live view of a running appliance: I/O per export and node, jobs.
    Top(top::TopArgs),
    /// The randomized halt test over many seeds.
    Soak(soak::SoakArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Build { release } => {
            harness::image::build(release).map(|p| println!("{}", p.display()))
        }
        Cmd::Image(args) => image::make(&args).map(|p| println!("{}", p.display())),
        Cmd::Run(args) => run::run(args),
        Cmd::Test(args) => test::test(args),
        Cmd::Fuzz(args) => fuzz::fuzz(args),
        Cmd::Graph(args) => graph::graph(args),
        Cmd::Top(args) => top::top(args),
        Cmd::Soak(args) => soak::soak(args),
        Cmd::Bench { which } => bench::bench(which),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
