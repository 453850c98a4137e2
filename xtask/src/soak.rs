//! `cargo xtask soak`: the load and fault tests, heavier than in `test`
//! (64 senders x 2000 messages, a larger hostile mix), in release mode.
//! Loopback only; bounded; stops by itself.

use anyhow::bail;

use crate::project::{self, cargo};

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if !args.is_empty() {
        bail!("soak takes no arguments; got {args:?}");
    }
    project::run(cargo().args(["build", "--release", "--bins", "--all-features"]))?;
    project::run(cargo().env("SEALPASS_SOAK", "1").args([
        "test",
        "--release",
        "--all-features",
        "--locked",
        "-p",
        "sealpass-receiver",
        "--test",
        "load",
        "--test",
        "service",
    ]))
}
