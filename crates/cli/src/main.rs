//! `pg2`: score, predict with, evaluate and inspect PaliGemma 2 checkpoints; see [`pg2_cli`].

use clap::Parser;

fn main() -> anyhow::Result<()> {
    pg2_cli::run(pg2_cli::Cli::parse())
}
