//! `cargo xtask noexec`: the demo and the conformance suite with
//! `vm.memfd_noexec=2`, under which the kernel refuses any memfd made
//! without `MFD_NOEXEC_SEAL`. It changes a system setting, so it runs only
//! when asked for by name (never as part of `cargo xtask test`), says so,
//! and puts the old value back on every path, failure included.

use std::sync::atomic::Ordering;

use anyhow::{Context, bail};

use crate::project::with_changed_setting;

const SETTING: &str = "/proc/sys/vm/memfd_noexec";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if !args.is_empty() {
        bail!("noexec takes no arguments; got {args:?}");
    }
    std::fs::metadata(SETTING)
        .with_context(|| format!("reading {SETTING} (the kernel may predate 6.3)"))?;
    // Build first: the setting should hold for as short a time as can be.
    crate::project::build_binaries(false)?;
    let (demo, conformance) = with_changed_setting("noexec", SETTING, "2", |interrupted| {
        let demo = crate::demo::run(&[]);
        let conformance = if interrupted.load(Ordering::SeqCst) {
            Err(anyhow::anyhow!("skipped: interrupted"))
        } else {
            crate::conformance::run(&[])
        };
        Ok((demo, conformance))
    })?;
    demo.context("the demo with vm.memfd_noexec=2")?;
    conformance.context("the conformance suite with vm.memfd_noexec=2")?;
    println!("noexec: 2 passed, 0 failed");
    Ok(())
}
