//! `sealpass-recv`: listen on a unix socket, verify every memfd handed over,
//! and print, store or describe what arrived.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sealpass_proto::{Seals, parse_size};
use sealpass_receiver::compat::BareSegment;
use sealpass_receiver::{
    Access, Config, Delivery, ErrorChain, IncomingTransfer, Listener, Service,
};
use serde::Serialize;

mod report;
mod store;

use report::{BareLine, BareSegmentLine, METADATA_FILE, describe, metadata_lines};

/// Receive sealed memfds over a unix socket. Every fd is checked with the
/// kernel (memfd? name, size, seals?) before it is mapped read-only; anything
/// else is rejected with a reason and the receiver keeps serving.
#[derive(Debug, Parser)]
#[command(name = "sealpass-recv", version, after_help = AFTER_HELP)]
struct Cli {
    /// Where to listen. A stale socket left there is replaced; anything else is refused.
    #[arg(
        long = "socket",
        id = "socket",
        value_name = "PATH",
        required_unless_present = "doctor"
    )]
    socket_arg: Option<PathBuf>,
    /// Print what this machine offers sealpass (kernel, memfd_noexec, huge
    /// pages, fd and mapping limits), what each means, how to change it, and exit.
    #[arg(long)]
    doctor: bool,
    /// Exit after the first accepted transfer.
    #[arg(long)]
    once: bool,
    /// Write each segment's bytes to stdout, in order (log lines go to stderr).
    #[arg(long, conflicts_with = "out")]
    print: bool,
    /// Write each segment to DIR/NAME, a transfer all or nothing: every
    /// segment is written into an unnamed file in DIR first, and all are
    /// renamed into place once all are written; a receiver killed meanwhile
    /// leaves nothing under a name. DIR must be a writable directory; if it
    /// does not exist it is created, but only when its parent exists. Names
    /// that could leave DIR are rejected.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// One JSON line per accepted transfer (to stdout; to stderr with --print).
    #[arg(long)]
    json: bool,
    /// Seals every segment must carry [default: shrink,grow,write; with
    /// --compat: none], as a list of seal names separated by ',' or '|'
    /// (seal, shrink, grow, write, future_write, exec; or none). Outside
    /// compat mode SHRINK and WRITE are always required: without them a
    /// mapping could fault or change under the reader.
    #[arg(long, value_name = "LIST")]
    require_seals: Option<Seals>,
    /// Accept bare fd passing over SOCK_STREAM, as plain programs do it: any
    /// payload is ignored, each fd must be a memfd, its bytes are copied out
    /// with pread (never mapped), and no answer is sent.
    #[arg(long)]
    compat: bool,
    /// Permissions of the socket file, in octal. It is created owner-only and
    /// widened to this after binding, so it is never more open than asked.
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    mode: u32,
    /// Accept peers with this user id (repeatable; with --allow-gid, either
    /// list admits). Without either, any peer that can open the socket.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Accept peers with this group id (repeatable).
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gids: Vec<u32>,
    /// Connections served at once; one more gets Reject(TooManyConnections).
    #[arg(long, value_name = "N", default_value_t = Config::default().max_connections())]
    max_connections: usize,
    /// Segments per message (at most the protocol's 253); more gets Reject(TooManySegments).
    #[arg(long, value_name = "N", default_value_t = 253, value_parser = clap::value_parser!(u16).range(1..=253))]
    max_segments: u16,
    /// Bytes one connection may hold mapped (one transfer); more gets Reject(MemoryLimit).
    #[arg(long, value_name = "SIZE", default_value = "8GiB", value_parser = parse_size)]
    max_mapped_per_connection: u64,
    /// Bytes all connections together may hold mapped; more gets Reject(MemoryLimit).
    #[arg(long, value_name = "SIZE", default_value = "64GiB", value_parser = parse_size)]
    max_mapped_total: u64,
    /// Seconds a new connection has to send its first message; then Reject(Timeout) (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    first_message_deadline: u64,
    /// Seconds a connection may stay silent between messages; then Reject(Timeout) (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    idle_timeout: u64,
    /// Accept memfds with holes (fewer bytes allocated than their size),
    /// which are refused with Reject(Sparse) by default. A RISK: reading a
    /// hole allocates a page charged to this process, held as long as the
    /// sender keeps the memfd, so a sender can exhaust this receiver's
    /// memory; the mapped-bytes limits count sizes, not this process's memory.
    #[arg(long)]
    allow_sparse: bool,
    /// The default since 0.1 (sparse memfds are refused); accepted so that
    /// older command lines keep working.
    #[arg(long, hide = true, conflicts_with = "allow_sparse")]
    refuse_sparse: bool,
    /// Read segments of at most SIZE bytes into this process's memory after
    /// verification instead of mapping them (faster below about 1 MiB);
    /// 0 maps every segment. SIZE takes 262144, 256K or 256KiB.
    #[arg(long, value_name = "SIZE", default_value = "256KiB", value_parser = sealpass_proto::parse_size)]
    copy_at_most: u64,
}

impl Cli {
    /// The socket path (present unless `--doctor`, which exits first).
    fn socket(&self) -> &Path {
        self.socket_arg.as_deref().unwrap_or(Path::new(""))
    }
}

const AFTER_HELP: &str = "\
Seal names: seal, shrink, grow, write, future_write, exec (case-insensitive),
separated by ',' or '|'; 'none' for no seals.

Exit status: 0 after SIGINT/SIGTERM or after --once's transfer; 1 a failure
while running (the socket could not be bound, ...); 2 a usage error (bad flag
or value, --out not a writable directory), found before the socket is bound.

Signals: SIGINT or SIGTERM stop accepting, answer what peers already sent
(waiting at most 5 s for peers that do not read their answers, then closing
them), remove the socket file and exit 0 (in --compat mode too). A second
SIGINT or SIGTERM while stopping exits at once, with status 130.

Logs go to stderr, one line per message, filtered by RUST_LOG (default info;
e.g. RUST_LOG=debug, RUST_LOG=warn).";

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            format!("invalid mode {text:?}: expected octal permissions such as 600 or 660")
        })
}

fn seconds(value: u64) -> Option<Duration> {
    (value > 0).then(|| Duration::from_secs(value))
}

impl Cli {
    /// The receiver's configuration from the flags; `default_seals` when
    /// --require-seals is not given.
    fn config(&self, default_seals: Seals) -> Config {
        let access = self.allow_gids.iter().fold(
            self.allow_uids
                .iter()
                .fold(Access::anyone(), |access, &uid| access.allow_uid(uid)),
            |access, &gid| access.allow_gid(gid),
        );
        let config = Config::builder()
            .required_seals(self.require_seals.unwrap_or(default_seals))
            .refuse_sparse(!self.allow_sparse)
            .access(access)
            .max_connections(self.max_connections)
            .max_segments(usize::from(self.max_segments))
            .max_mapped_per_connection(self.max_mapped_per_connection)
            .max_mapped_total(self.max_mapped_total)
            .first_message_deadline(seconds(self.first_message_deadline))
            .idle_timeout(seconds(self.idle_timeout))
            .copy_at_most(self.copy_at_most)
            .build();
        config.unwrap_or_else(|error| usage_error(error.to_string()))
    }
}

/// Writes every segment of a transfer to `dir`, and its metadata (if any)
/// to `dir`/sealpass-metadata.json, all or nothing.
fn store(dir: &Path, transfer: &IncomingTransfer) -> anyhow::Result<()> {
    let mut items: Vec<store::Item<'_>> = transfer
        .segments()
        .iter()
        .map(|segment| -> store::Item<'_> {
            (
                segment.name(),
                Box::new(|file: &mut fs::File| Ok(file.write_all(segment.bytes())?)),
            )
        })
        .collect();
    if !transfer.metadata().is_empty() {
        if transfer.segment(METADATA_FILE).is_some() {
            anyhow::bail!(
                "segment name {METADATA_FILE:?} is where --out stores the transfer's metadata; \
                 expected another name"
            );
        }
        let lines = metadata_lines(transfer.metadata());
        items.push((
            METADATA_FILE,
            Box::new(move |file: &mut fs::File| {
                serde_json::to_writer_pretty(&mut *file, &lines)?;
                Ok(file.write_all(b"\n")?)
            }),
        ));
    }
    store::store_all(dir, &items)
}

/// Checks `--out DIR` before anything is bound: DIR must be a directory this
/// process can create files in. A missing DIR is created, but only when its
/// parent exists, so a typo cannot build a tree of directories.
fn prepare_out_dir(dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    match fs::metadata(dir) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => return Err(format!("--out {shown}: exists and is not a directory")),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(dir).map_err(|error| {
                if error.kind() == io::ErrorKind::NotFound {
                    format!(
                        "--out {shown}: does not exist, and neither does its parent; \
                         create the parent first (only the last component is created)"
                    )
                } else {
                    format!("--out {shown}: does not exist and cannot be created: {error}")
                }
            })?;
        }
        Err(error) => return Err(format!("--out {shown}: {error}")),
    }
    tempfile::Builder::new()
        .prefix(".sealpass-check-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|error| {
            format!(
                "--out {shown}: cannot create files in it ({error}); expected a writable directory"
            )
        })?;
    match store::remove_stale_temporaries(dir) {
        Ok(removed) => {
            for path in removed {
                eprintln!(
                    "sealpass-recv: removed {}, left by a receiver that is no longer running",
                    path.display()
                );
            }
            Ok(())
        }
        Err(error) => Err(format!("--out {shown}: listing it failed: {error}")),
    }
}

fn handle(cli: &Cli, delivery: &Delivery<'_>) -> anyhow::Result<()> {
    let transfer = delivery.transfer;
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
        emit_json(
            cli,
            &describe(transfer, &delivery.peer, delivery.connection),
        )?;
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

fn handle_bare(cli: &Cli, batch: &[BareSegment]) -> anyhow::Result<()> {
    if let Some(dir) = &cli.out {
        let items: Vec<store::Item<'_>> = batch
            .iter()
            .map(|segment| -> store::Item<'_> {
                (
                    segment.name(),
                    Box::new(|file: &mut fs::File| Ok(segment.copy_to(file).map(drop)?)),
                )
            })
            .collect();
        store::store_all(dir, &items)?;
    }
    for segment in batch {
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

/// Waits until `fd` is readable (`true`) or a stop was asked through `stop`
/// by SIGINT or SIGTERM (`false`).
fn readable_or_stopped(fd: BorrowedFd<'_>, stop: &UnixStream) -> io::Result<bool> {
    loop {
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
            Ok(_) => {}
        }
        let [ready, stopped] = fds;
        if stopped.any().unwrap_or(false) {
            return Ok(false);
        }
        if ready.any().unwrap_or(false) {
            return Ok(true);
        }
    }
}

/// Serves bare peers: no header, no answer. Returns once stopped by a
/// signal, or with `--once` after the first batch that delivered at least
/// one accepted memfd.
fn serve_bare(
    cli: &Cli,
    listener: &Listener,
    required: Seals,
    stop: &UnixStream,
) -> anyhow::Result<()> {
    loop {
        if !readable_or_stopped(listener.as_fd(), stop)? {
            return Ok(());
        }
        let mut connection = match listener.accept_bare() {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!("{}", ErrorChain(&error));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        loop {
            if !readable_or_stopped(connection.socket(), stop)? {
                return Ok(());
            }
            let batch = match connection.receive(required) {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(error) => {
                    tracing::info!("connection closed: {}", ErrorChain(&error));
                    break;
                }
            };
            let mut accepted = Vec::new();
            for result in batch {
                match result {
                    Ok(segment) => accepted.push(segment),
                    Err(error) => tracing::info!("refused a bare fd: {error}"),
                }
            }
            if accepted.is_empty() {
                continue;
            }
            match handle_bare(cli, &accepted) {
                Ok(()) => {
                    tracing::info!(
                        "received {}: {}",
                        count(accepted.len(), "bare memfd"),
                        accepted
                            .iter()
                            .map(|s| format!(
                                "{} ({} bytes, sealed {})",
                                s.name(),
                                s.size(),
                                s.seals()
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    if cli.once {
                        return Ok(());
                    }
                }
                Err(error) => tracing::warn!("failed: {error:#}"),
            }
        }
    }
}

/// `1 segment`, `2 segments`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A byte count as the flags take it: `8 GiB`, `512 MiB`, `4097 bytes`.
fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| n >= *unit && n % unit == 0)
        .map_or_else(
            || format!("{n} bytes"),
            |(unit, name)| format!("{} {name}", n / unit),
        )
}

fn wait(limit: Option<Duration>) -> String {
    limit.map_or_else(|| "never".to_owned(), |d| format!("{} s", d.as_secs()))
}

/// The start-up line: where, and every limit in force, in words.
fn describe_start(cli: &Cli, config: &Config) -> String {
    let access = config.access();
    let policy = config.policy();
    let peers = if access.admits_anyone() {
        "any peer that can open the socket".to_owned()
    } else {
        let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        format!(
            "peers with uid in [{}] or gid in [{}]",
            list(access.uids()),
            list(access.gids())
        )
    };
    format!(
        "listening on {} (mode {:o}); requiring seals {}{}; at most {} connections, {} per message, \
         {} mapped per connection and {} in all; first message within {}, idle timeout {}; admitting {peers}",
        cli.socket().display(),
        cli.mode,
        policy.required(),
        if policy.refuses_sparse() {
            ", no holes"
        } else {
            ", holes accepted (--allow-sparse: a sender can spend this process's memory)"
        },
        config.max_connections(),
        count(config.max_segments(), "segment"),
        bytes(config.max_mapped_per_connection()),
        bytes(config.max_mapped_total()),
        wait(config.first_message_deadline()),
        wait(config.idle_timeout()),
    )
}

/// The read end of a pipe that SIGINT and SIGTERM write a byte to.
fn signal_pipe() -> anyhow::Result<UnixStream> {
    let (signals, writer) = UnixStream::pair().context("creating the signal pipe")?;
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::low_level::pipe::register(signal, writer.try_clone()?)
            .context("installing the signal handler")?;
    }
    Ok(signals)
}

/// The peers `--allow-uid`/`--allow-gid` admit that the socket's mode
/// keeps from connecting at all (connecting needs write permission on the
/// socket file, which is this process's user's and group's): one warning
/// each, saying what to pass. Root connects whatever the mode.
fn shut_out_by_mode(cli: &Cli) -> Vec<String> {
    let (own_uid, own_gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let (group_writes, others_write) = (cli.mode & 0o020 != 0, cli.mode & 0o002 != 0);
    let advice = "pass --mode 660 and give the socket's group to the peers, or --mode 666 to leave \
                  it to the allow lists";
    let uids = cli
        .allow_uids
        .iter()
        .filter(|&&uid| uid != 0 && uid != own_uid && !group_writes && !others_write)
        .map(|uid| {
            format!(
                "--allow-uid {uid} admits uid {uid}, but the socket's mode {:o} lets only uid \
                 {own_uid} open it: uid {uid} gets EACCES at connect; {advice}",
                cli.mode
            )
        });
    let gids = cli
        .allow_gids
        .iter()
        .filter(|&&gid| !(others_write || (gid == own_gid && group_writes)))
        .map(|gid| {
            format!(
                "--allow-gid {gid} admits gid {gid}, but the socket's mode {:o} and group \
                 {own_gid} keep its members out: they get EACCES at connect; {advice}",
                cli.mode
            )
        });
    uids.chain(gids).collect()
}

/// A usage error found after parsing: printed as clap prints its own, exit 2.
fn usage_error(message: String) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(dir) = &cli.out {
        if let Err(message) = prepare_out_dir(dir) {
            usage_error(message);
        }
    }
    raise_fd_limit();
    if cli.compat {
        let mut listener = Listener::bind_compat(cli.socket())?;
        listener.set_config(cli.config(Seals::empty()));
        let stop = signal_pipe()?;
        let required = cli.require_seals.unwrap_or(Seals::empty());
        tracing::info!(
            "listening on {} in compat mode (SOCK_STREAM, bare fds, requiring seals {required})",
            listener.path().display()
        );
        serve_bare(&cli, &listener, required, &stop)?;
        tracing::info!("stopped");
        return Ok(());
    }
    let config = cli.config(Seals::RECEIVER_DEFAULT);
    let description = describe_start(&cli, &config);
    // Signals first: everything the receiver holds while it serves nobody
    // is open before its socket exists.
    let signals = signal_pipe()?;
    let mut listener = Listener::bind(cli.socket())?;
    listener.set_config(config);
    if cli.mode != 0o600 {
        fs::set_permissions(cli.socket(), fs::Permissions::from_mode(cli.mode)).with_context(
            || format!("setting mode {:o} on {}", cli.mode, cli.socket().display()),
        )?;
    }
    let service = Service::new(listener)?;
    let shutdown = service.shutdown_handle();
    let stopper = shutdown.clone();
    std::thread::spawn(move || {
        // A signal's byte, or the pipe's end: stop either way.
        let _ = io::Read::read(&mut &signals, &mut [0u8; 1]);
        stopper.shutdown();
        // A second signal while stopping: exit at once.
        if matches!(io::Read::read(&mut &signals, &mut [0u8; 1]), Ok(1)) {
            eprintln!("sealpass-recv: a second signal while stopping: exiting now");
            std::process::exit(130);
        }
    });
    // Logged once everything is in place: from here the receiver's fds are
    // those it holds whenever it serves nobody.
    tracing::info!("{description}");
    for warning in shut_out_by_mode(&cli) {
        tracing::warn!("{warning}");
    }
    let cli = Arc::new(cli);
    service.run(move |delivery| {
        handle(&cli, delivery).map_err(|e| format!("{e:#}"))?;
        if cli.once {
            shutdown.shutdown();
        }
        Ok::<(), String>(())
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one, as a server that never
/// uses `select` may: every connection and every segment in flight holds an
/// fd, and a batch takes at most half the soft limit in fds (so 2 messages
/// at the common default of 1024, 32 from 16192). The hard limit, which the
/// operator sets, is left alone; a refusal only leaves the soft one as it was.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::info!(
            "raised the soft fd limit (RLIMIT_NOFILE) from {soft} to the hard limit, {hard}"
        ),
        Err(errno) => tracing::warn!(
            "the soft fd limit (RLIMIT_NOFILE) stays {soft}: raising it to the hard limit, {hard}, failed: {errno}"
        ),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.doctor {
        print!("{}", sealpass_kernel::host::Host::read());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(io::stderr)
        .with_ansi(false)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sealpass-recv: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
