//! `echoport client`: the original's small test client, made strict.

use std::process::ExitCode;

/// Options of `echoport client`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs the client.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("echoport client is not written yet")
}
