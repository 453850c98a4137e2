//! `cargo xtask noexec`: the demo and the conformance suite with
//! `vm.memfd_noexec=2`, under which the kernel refuses any memfd made
//! without `MFD_NOEXEC_SEAL`. It changes a system setting, so it runs only
//! when asked for by name (never as part of `cargo xtask test`), says so,
//! and puts the old value back on every path, failure included.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

const SETTING: &str = "/proc/sys/vm/memfd_noexec";

/// Puts the setting back when dropped.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        match std::fs::write(SETTING, &self.0) {
            Ok(()) => eprintln!("noexec: vm.memfd_noexec restored to {}", self.0.trim()),
            Err(error) => eprintln!(
                "noexec: could not restore vm.memfd_noexec to {}: {error}; run: sysctl -w vm.memfd_noexec={}",
                self.0.trim(),
                self.0.trim()
            ),
        }
    }
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if !args.is_empty() {
        bail!("noexec takes no arguments; got {args:?}");
    }
    let before = std::fs::read_to_string(SETTING)
        .with_context(|| format!("reading {SETTING} (the kernel may predate 6.3)"))?;
    // Build first: the setting should hold for as short a time as can be.
    crate::project::build_binaries(false)?;
    eprintln!(
        "noexec: setting vm.memfd_noexec from {} to 2 for this run",
        before.trim()
    );
    // A caught signal (not the default action, which would kill xtask
    // before `Restore` runs) lets the children die of Ctrl-C, since exec
    // resets caught signals to their default, while xtask lives to restore
    // the setting.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))
            .with_context(|| format!("catching signal {signal}"))?;
    }
    let restore = Restore(before);
    std::fs::write(SETTING, "2").context("setting vm.memfd_noexec=2 (needs root)")?;
    let demo = crate::demo::run(&[]);
    let conformance = if interrupted.load(Ordering::SeqCst) {
        Err(anyhow::anyhow!("skipped: interrupted"))
    } else {
        crate::conformance::run(&[])
    };
    drop(restore);
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted; vm.memfd_noexec was put back");
    }
    demo.context("the demo with vm.memfd_noexec=2")?;
    conformance.context("the conformance suite with vm.memfd_noexec=2")?;
    println!("noexec: 2 passed, 0 failed");
    Ok(())
}
