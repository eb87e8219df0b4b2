//! `echoport bench` where the load generator does not run yet (Windows): it says so.

use std::process::ExitCode;

/// Options of `echoport bench` (none here: the load generator is Linux-only for now).
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Explains that the load generator is Linux-only for now.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "the load generator (echoport bench) is Linux-only for now; run it on Linux against \
         this server (echoport serve works here)"
    )
}
