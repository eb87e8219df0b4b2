//! `echoport bench`: the load generator.

use std::process::ExitCode;

/// Options of `echoport bench`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs the load generator.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("echoport bench is not written yet")
}
