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

/// A system setting (a file under `/proc/sys` or `/sys`) changed for the
/// length of a task, put back when dropped, on every path out. Tasks that
/// change one run only when asked for by name, and say so.
pub(crate) struct ChangedSetting {
    path: &'static str,
    /// What the file held before: for a `[selected]` sysfs list, the word
    /// between the brackets.
    before: String,
    label: &'static str,
}

impl ChangedSetting {
    /// Writes `value` to `path`, saying what it does, and remembers the old
    /// value. Needs root.
    pub(crate) fn set(
        label: &'static str,
        path: &'static str,
        value: &str,
    ) -> anyhow::Result<ChangedSetting> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let before = match (text.find('['), text.find(']')) {
            (Some(open), Some(close)) if open < close => {
                text.get(open + 1..close).unwrap_or_default().to_owned()
            }
            _ => text.trim().to_owned(),
        };
        eprintln!("{label}: setting {path} from {before} to {value} for this run");
        let changed = ChangedSetting {
            path,
            before,
            label,
        };
        std::fs::write(path, value)
            .with_context(|| format!("writing {value} to {path} (needs root)"))?;
        Ok(changed)
    }
}

impl Drop for ChangedSetting {
    fn drop(&mut self) {
        let (label, path, before) = (self.label, self.path, &self.before);
        match std::fs::write(path, before) {
            Ok(()) => eprintln!("{label}: {path} restored to {before}"),
            Err(error) => eprintln!(
                "{label}: could not restore {path} to {before}: {error}; run: echo {before} > {path}"
            ),
        }
    }
}

/// Runs `task` with the setting at `path` changed to `value` (said so), and
/// puts the old value back after, whatever happens, Ctrl-C included. The
/// task is handed the flag that says an interrupt came, to stop early; an
/// interrupted run ends in an error saying the setting was put back.
pub(crate) fn with_changed_setting<T>(
    label: &'static str,
    path: &'static str,
    value: &str,
    task: impl FnOnce(&std::sync::atomic::AtomicBool) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let interrupted = catch_interrupts()?;
    let changed = ChangedSetting::set(label, path, value)?;
    let result = task(&interrupted);
    drop(changed);
    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("interrupted; {path} was put back");
    }
    result
}

/// Catches SIGINT, SIGTERM and SIGHUP for the rest of the task, so that a
/// `ChangedSetting` is put back on Ctrl-C: the children, whose caught
/// signals exec resets to their default, still die of it, while xtask lives
/// to restore. Returns the flag that says a signal came.
pub(crate) fn catch_interrupts() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register(signal, std::sync::Arc::clone(&interrupted))
            .with_context(|| format!("catching signal {signal}"))?;
    }
    Ok(interrupted)
}
