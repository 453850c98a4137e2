//! Where things are, and running cargo.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir).to_owned()
}

/// `cargo` as the one running this task, run from the workspace root.
pub(crate) fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

/// Cargo's target directory.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Runs `command`, failing if it fails.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Builds the two binaries and returns their paths (sender, receiver).
pub(crate) fn build_binaries(release: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut build = cargo();
    build.args([
        "build",
        "--bins",
        "-p",
        "sealpass-sender",
        "-p",
        "sealpass-receiver",
        "--features",
        "sealpass-sender/cli,sealpass-receiver/cli",
    ]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let dir = target_dir().join(if release { "release" } else { "debug" });
    Ok((dir.join("sealpass-send"), dir.join("sealpass-recv")))
}

/// A scratch directory removed when dropped.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new(label: &str) -> anyhow::Result<Scratch> {
        let path = std::env::temp_dir().join(format!("sealpass-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
