//! `sealpass-recv`: listen on a unix socket, verify every memfd handed over,
//! and print, store or describe what arrived.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use sealpass_proto::{Policy, Seals};
use sealpass_receiver::compat::BareSegment;
use sealpass_receiver::{Connection, Listener, Outcome, ServeError, VerifiedTransfer};
use serde::Serialize;

/// Receive sealed memfds over a unix socket. Every fd is checked with the
/// kernel (memfd? name, size, seals?) before it is mapped read-only; anything
/// else is rejected with a reason and the receiver keeps serving.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Where to listen. A stale socket left there is replaced; anything else is refused.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Exit after the first accepted transfer.
    #[arg(long)]
    once: bool,
    /// Write each segment's bytes to stdout, in order (log lines go to stderr).
    #[arg(long, conflicts_with = "out")]
    print: bool,
    /// Write each segment to DIR/NAME (names that could leave DIR are rejected).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// One JSON line per accepted transfer (to stdout; to stderr with --print).
    #[arg(long)]
    json: bool,
    /// Seals every segment must carry [default: shrink,grow,write; with
    /// --compat: none]. Outside compat mode SHRINK and WRITE are always
    /// required: without them a mapping could fault or change under the reader.
    #[arg(long, value_name = "LIST")]
    require_seals: Option<Seals>,
    /// Accept bare fd passing over SOCK_STREAM, as plain programs do it: any
    /// payload is ignored, each fd must be a memfd, its bytes are copied out
    /// with pread (never mapped), and no answer is sent.
    #[arg(long)]
    compat: bool,
    /// Close a connection that sends nothing for this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    idle_timeout: u64,
}

#[derive(Serialize)]
struct TransferLine<'a> {
    id: u64,
    version: String,
    segments: Vec<SegmentLine<'a>>,
}

#[derive(Serialize)]
struct SegmentLine<'a> {
    name: &'a str,
    size: u64,
    seals: String,
    /// The first bytes, as hex, so a reader can eyeball the content.
    head: String,
}

fn describe(transfer: &VerifiedTransfer) -> TransferLine<'_> {
    TransferLine {
        id: transfer.id(),
        version: transfer.version().to_string(),
        segments: transfer
            .segments()
            .iter()
            .map(|segment| SegmentLine {
                name: segment.name(),
                size: segment.size(),
                seals: segment.seals().to_string(),
                head: segment
                    .bytes()
                    .iter()
                    .take(16)
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            })
            .collect(),
    }
}

/// A name that is one plain path component, so DIR/NAME stays in DIR.
fn safe_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

/// Writes every segment to `dir`, each through a temporary file renamed into
/// place, so a reader of `dir` never sees a half-written segment.
fn store(dir: &Path, transfer: &VerifiedTransfer) -> anyhow::Result<()> {
    if let Some(bad) = transfer
        .segments()
        .iter()
        .find(|s| !safe_file_name(s.name()))
    {
        bail!(
            "segment name {:?} could leave {}; expected a plain file name",
            bad.name(),
            dir.display()
        );
    }
    for segment in transfer.segments() {
        write_into(dir, segment.name(), |file| {
            Ok(file.write_all(segment.bytes())?)
        })?;
    }
    Ok(())
}

/// Writes DIR/NAME through a temporary file renamed into place, so a reader
/// of DIR never sees a half-written segment. NAME must be a plain file name.
fn write_into(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut fs::File) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if !safe_file_name(name) {
        bail!(
            "segment name {name:?} could leave {}; expected a plain file name",
            dir.display()
        );
    }
    let target = dir.join(name);
    let partial = dir.join(format!(".{name}.partial"));
    let result = fs::File::create(&partial)
        .map_err(anyhow::Error::from)
        .and_then(|mut file| write(&mut file))
        .and_then(|()| Ok(fs::rename(&partial, &target)?));
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result.with_context(|| format!("writing {}", target.display()))
}

fn handle(cli: &Cli, transfer: &VerifiedTransfer) -> anyhow::Result<()> {
    if let Some(dir) = &cli.out {
        store(dir, transfer)?;
    }
    if cli.print {
        let mut stdout = io::stdout().lock();
        for segment in transfer.segments() {
            stdout
                .write_all(segment.bytes())
                .context("writing to stdout")?;
        }
        stdout.flush().context("writing to stdout")?;
    }
    if cli.json {
        emit_json(cli, &describe(transfer))?;
    }
    Ok(())
}

/// One JSON line: to stdout, or to stderr when stdout carries `--print` bytes.
fn emit_json(cli: &Cli, value: &impl Serialize) -> anyhow::Result<()> {
    let line = serde_json::to_string(value)?;
    if cli.print {
        eprintln!("{line}");
        return Ok(());
    }
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

/// Serves one connection until it ends; true once a transfer was accepted
/// and `--once` asks to stop.
fn serve(cli: &Cli, mut connection: Connection) -> bool {
    while connection.is_open() {
        match connection.serve_one(|transfer| handle(cli, transfer).map_err(|e| format!("{e:#}"))) {
            Ok(Outcome::Accepted {
                id,
                segments,
                bytes,
            }) => {
                eprintln!(
                    "sealpass-recv: accepted transfer {id}: {segments} segments, {bytes} bytes"
                );
                if cli.once {
                    return true;
                }
            }
            Ok(Outcome::Rejected {
                id,
                reason,
                message,
            }) => {
                eprintln!("sealpass-recv: rejected transfer {id}: {reason}: {message}");
            }
            Ok(Outcome::Closed) => break,
            Ok(other) => eprintln!("sealpass-recv: {other:?}"),
            Err(error @ (ServeError::IdleTimeout(_) | ServeError::Answer { .. })) => {
                eprintln!("sealpass-recv: connection closed: {error}");
            }
            Err(error) => eprintln!("sealpass-recv: connection failed: {error}"),
        }
    }
    false
}

/// The JSON line for a batch of bare fds.
#[derive(Serialize)]
struct BareLine<'a> {
    compat: bool,
    segments: Vec<BareSegmentLine<'a>>,
}

#[derive(Serialize)]
struct BareSegmentLine<'a> {
    name: &'a str,
    size: u64,
    seals: String,
}

fn store_bare(dir: &Path, segment: &BareSegment) -> anyhow::Result<()> {
    write_into(dir, segment.name(), |file| {
        Ok(segment.copy_to(file).map(drop)?)
    })
}

fn handle_bare(cli: &Cli, batch: &[BareSegment]) -> anyhow::Result<()> {
    for segment in batch {
        if let Some(dir) = &cli.out {
            store_bare(dir, segment)?;
        }
        if cli.print {
            let mut stdout = io::stdout().lock();
            segment.copy_to(&mut stdout)?;
            stdout.flush().context("writing to stdout")?;
        }
    }
    if cli.json {
        let segments = batch
            .iter()
            .map(|s| BareSegmentLine {
                name: s.name(),
                size: s.size(),
                seals: s.seals().to_string(),
            })
            .collect();
        emit_json(
            cli,
            &BareLine {
                compat: true,
                segments,
            },
        )?;
    }
    Ok(())
}

/// Serves bare peers: no header, no answer. Returns after the first batch with `--once`.
fn serve_bare(cli: &Cli, listener: &Listener, required: Seals) -> anyhow::Result<()> {
    loop {
        let mut connection = match listener.accept_bare() {
            Ok(connection) => connection,
            Err(error) => {
                eprintln!("sealpass-recv: {error}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        loop {
            let batch = match connection.receive(required) {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(error) => {
                    eprintln!("sealpass-recv: connection closed: {error}");
                    break;
                }
            };
            let mut accepted = Vec::new();
            for result in batch {
                match result {
                    Ok(segment) => accepted.push(segment),
                    Err(error) => eprintln!("sealpass-recv: refused {error}"),
                }
            }
            match handle_bare(cli, &accepted) {
                Ok(()) => eprintln!(
                    "sealpass-recv: received {} bare memfds: {}",
                    accepted.len(),
                    accepted
                        .iter()
                        .map(|s| format!("{} ({} bytes, sealed {})", s.name(), s.size(), s.seals()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(error) => eprintln!("sealpass-recv: failed: {error:#}"),
            }
            drop(accepted);
            if cli.once {
                return Ok(());
            }
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if let Some(dir) = &cli.out {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if cli.compat {
        let mut listener = Listener::bind_compat(&cli.socket)?;
        listener.set_idle_timeout(
            (cli.idle_timeout > 0).then(|| Duration::from_secs(cli.idle_timeout)),
        );
        let required = cli.require_seals.unwrap_or(Seals::empty());
        eprintln!(
            "sealpass-recv: listening on {} in compat mode (SOCK_STREAM, bare fds, requiring {required})",
            listener.path().display()
        );
        return serve_bare(cli, &listener, required);
    }
    let policy = Policy::new(cli.require_seals.unwrap_or(Seals::RECEIVER_DEFAULT));
    let mut listener = Listener::bind(&cli.socket)?;
    listener.set_policy(policy);
    listener
        .set_idle_timeout((cli.idle_timeout > 0).then(|| Duration::from_secs(cli.idle_timeout)));
    eprintln!(
        "sealpass-recv: listening on {} (requiring {})",
        listener.path().display(),
        policy.required()
    );
    loop {
        let connection = match listener.accept() {
            Ok(connection) => connection,
            Err(error) => {
                // EMFILE and the like pass; a broken listener does not.
                eprintln!("sealpass-recv: {error}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if serve(cli, connection) {
            return Ok(());
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sealpass-recv: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
