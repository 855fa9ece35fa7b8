//! `sweep RECIPE.toml --grid KEY=A,B,...`: see [`pg2_cli::sweep`].

use clap::Parser;

fn main() -> anyhow::Result<()> {
    pg2_cli::sweep::run(&pg2_cli::sweep::SweepCli::parse())
}
