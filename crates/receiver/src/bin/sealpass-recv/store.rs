//! `--out DIR`: a transfer's segments written into DIR all or nothing, and
//! nothing left under a name by a receiver that dies while writing.
//!
//! Each segment is written into an unnamed file in DIR (`O_TMPFILE`), so a
//! crash or an OOM kill mid-write leaves nothing behind: the kernel frees an
//! unnamed file with its last fd. Only once every segment of the transfer is
//! written is each linked under a temporary name
//! (`.sealpass-PID-XXXXXXXX`) and then renamed over DIR/NAME: a write that
//! fails (`ENOSPC`, `EDQUOT`) publishes nothing. Where DIR's filesystem has
//! no `O_TMPFILE`, segments are written into such named temporaries from the
//! start. A receiver that starts removes the temporaries of receivers that
//! are no longer running, so none outlives a restart.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::fcntl::AtFlags;

/// Where one segment's bytes are until it is published.
enum Staged {
    /// An `O_TMPFILE`: no name until linked.
    Unnamed(File),
    /// A named temporary, removed when dropped unless persisted.
    Named(tempfile::NamedTempFile),
}

/// The prefix of every temporary this process names in DIR.
fn own_prefix() -> String {
    format!(".sealpass-{}-", std::process::id())
}

/// A name that is one plain path component, so DIR/NAME stays in DIR.
pub(crate) fn safe_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

/// A file in `dir` to write into: unnamed where the filesystem allows.
fn stage(dir: &Path) -> io::Result<Staged> {
    match OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_TMPFILE)
        .open(dir)
    {
        Ok(file) => Ok(Staged::Unnamed(file)),
        // No O_TMPFILE on this filesystem (or kernel).
        Err(error)
            if matches!(
                error.raw_os_error(),
                Some(nix::libc::EOPNOTSUPP | nix::libc::EISDIR | nix::libc::EINVAL)
            ) =>
        {
            tempfile::Builder::new()
                .prefix(&own_prefix())
                .tempfile_in(dir)
                .map(Staged::Named)
        }
        Err(error) => Err(error),
    }
}

/// Named temporaries made while publishing; those not yet renamed into
/// place are removed when this is dropped, on every path.
struct Linked(Vec<(PathBuf, PathBuf)>);

impl Drop for Linked {
    fn drop(&mut self) {
        for (temporary, _) in &self.0 {
            let _ = fs::remove_file(temporary);
        }
    }
}

/// Gives an unnamed file a temporary name in `dir`.
fn link_unnamed(dir: &Path, file: &File) -> io::Result<PathBuf> {
    let source = format!("/proc/self/fd/{}", file.as_raw_fd());
    for attempt in 0u32.. {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let temporary = dir.join(format!("{}{:08x}", own_prefix(), nanos ^ attempt));
        match nix::unistd::linkat(
            nix::fcntl::AT_FDCWD,
            source.as_str(),
            nix::fcntl::AT_FDCWD,
            &temporary,
            AtFlags::AT_SYMLINK_FOLLOW,
        ) {
            Ok(()) => return Ok(temporary),
            Err(Errno::EEXIST) if attempt < 64 => continue,
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
    Err(io::Error::from(Errno::EEXIST))
}

/// One segment to store: its file name, and what writes its bytes.
pub(crate) type Item<'a> = (&'a str, Box<dyn Fn(&mut File) -> anyhow::Result<()> + 'a>);

/// Writes every item to DIR/NAME, all or nothing: DIR/NAME of each appears
/// only once every item was written, and a failure on the way leaves DIR as
/// it was. Names must be plain file names, not naming a directory in DIR.
pub(crate) fn store_all(dir: &Path, items: &[Item<'_>]) -> anyhow::Result<()> {
    for (name, _) in items {
        if !safe_file_name(name) {
            bail!(
                "segment name {name:?} could leave {}; expected a plain file name",
                dir.display()
            );
        }
        let target = dir.join(name);
        if fs::symlink_metadata(&target).is_ok_and(|metadata| metadata.is_dir()) {
            bail!(
                "{} is a directory; a segment named {name:?} cannot replace it",
                target.display()
            );
        }
    }
    let mut staged = Vec::with_capacity(items.len());
    for (name, write) in items {
        let target = dir.join(name);
        let mut file =
            stage(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
        let written = match &mut file {
            Staged::Unnamed(file) => write(file),
            Staged::Named(file) => write(file.as_file_mut()),
        };
        written.with_context(|| format!("writing {}", target.display()))?;
        staged.push((file, target));
    }
    // Every byte is written: only names change from here on.
    let mut linked = Linked(Vec::with_capacity(staged.len()));
    let mut named = Vec::new();
    for (file, target) in staged {
        match file {
            Staged::Unnamed(file) => {
                let temporary = link_unnamed(dir, &file)
                    .with_context(|| format!("naming the file written for {}", target.display()))?;
                linked.0.push((temporary, target));
            }
            Staged::Named(file) => named.push((file, target)),
        }
    }
    for (file, target) in named {
        let (_, path) = file.into_parts();
        let temporary = path.keep().context("keeping a temporary file")?;
        linked.0.push((temporary, target));
    }
    let count = linked.0.len();
    for (published, (temporary, target)) in linked.0.iter().enumerate() {
        // On failure the guard removes every temporary name; those already
        // renamed into place are gone from it, so that touches only the rest.
        fs::rename(temporary, target).with_context(|| {
            format!(
                "renaming into {} ({published} of {count} segments published)",
                target.display()
            )
        })?;
    }
    linked.0.clear();
    Ok(())
}

/// Removes the temporaries that receivers no longer running left in `dir`
/// (`.sealpass-PID-…` of a PID that is gone; `.sealpass-XXXXXX`, the names
/// of versions before 0.1.1, which left them behind when killed). Returns
/// what it removed.
pub(crate) fn remove_stale_temporaries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".sealpass-")) else {
            continue;
        };
        let stale = match rest.split_once('-') {
            Some((pid, _)) => pid
                .parse::<i32>()
                .is_ok_and(|pid| pid > 0 && !process_is_alive(pid)),
            None => rest.len() == 6 && rest.bytes().all(|b| b.is_ascii_alphanumeric()),
        };
        if stale && entry.file_type().is_ok_and(|kind| kind.is_file()) {
            fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Whether a process with this pid exists (it may be another program that
/// took the pid since: then its temporaries are kept, which is safe).
fn process_is_alive(pid: i32) -> bool {
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(Errno::ESRCH)
    )
}
