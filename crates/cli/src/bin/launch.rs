//! `launch RECIPE.toml`: see [`pg2_cli::launch`].

use clap::Parser;

fn main() -> anyhow::Result<()> {
    pg2_cli::launch::run(&pg2_cli::launch::LaunchCli::parse())
}
