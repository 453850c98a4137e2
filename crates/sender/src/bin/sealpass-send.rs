//! `sealpass-send`: put bytes into sealed memfds and hand them, in one
//! message, to a `sealpass-recv`.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser};
use nix::errno::Errno;
use sealpass_proto::limits::MAX_METADATA_LEN;
use sealpass_proto::{Metadata, Seals, Segment, validate_transfer};
use sealpass_sender::{Pages, SealedSegment, SendError, Sender, Verdict, parse_size};

/// Hand buffers to a receiver as sealed memfds: zero copies, verified by the
/// kernel. All segments go in one message, in the order given.
#[derive(Debug, Parser)]
#[command(name = "sealpass-send", version, after_help = AFTER_HELP)]
struct Cli {
    /// The receiver's socket. Repeat it to send the same sealed segments to
    /// several receivers, one connection each (fan-out): one copy in memory,
    /// every verdict reported on its own.
    #[arg(
        long = "socket",
        id = "socket",
        value_name = "PATH",
        required_unless_present = "doctor"
    )]
    sockets: Vec<PathBuf>,
    /// With several --socket: one JSON line per receiver on stdout (socket,
    /// verdict, id, reason, message, error) instead of the text lines.
    #[arg(long)]
    json: bool,
    /// Print what this machine offers sealpass (kernel, memfd_noexec, huge
    /// pages, fd and mapping limits), what each means, how to change it, and exit.
    #[arg(long)]
    doctor: bool,
    /// A segment named NAME holding the bytes of the regular file at PATH
    /// (a FIFO or a device is refused: use --stdin for streams).
    #[arg(long = "file", value_name = "NAME=PATH", value_parser = parse_file)]
    files: Vec<(String, PathBuf)>,
    /// A segment named NAME of SIZE bytes, each BYTE (a character, or 0xNN).
    /// SIZE takes 4194304, 0x400000, 4M or 4MiB.
    #[arg(long = "fill", value_name = "NAME=BYTE:SIZE", value_parser = parse_fill)]
    fills: Vec<(String, u8, u64)>,
    /// A segment named NAME holding everything read from stdin (once), at
    /// most --max-stream-size bytes.
    #[arg(long = "stdin", value_name = "NAME", value_parser = parse_name)]
    stdin: Option<String>,
    /// The most bytes --stdin takes; a stream that yields more is an error
    /// rather than a memfd that grows until memory runs out.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    max_stream_size: u64,
    /// Take the pages of --fill and --file segments from the hugetlb pool
    /// (MFD_HUGETLB) where the machine can: a size of whole huge pages
    /// (2 MiB) and a pool with room (sysctl vm.nr_hugepages). Other
    /// segments use shmem as usual; the summary says which each got.
    #[arg(long)]
    hugetlb: bool,
    /// Seals to apply to every segment.
    #[arg(long, value_name = "LIST", default_value = "shrink,grow,write,seal")]
    seals: Seals,
    /// Keep retrying the connection for this many seconds while the receiver starts.
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = parse_seconds)]
    connect_timeout: f64,
    /// Send bare fds over SOCK_STREAM with a 256-byte zero payload and no
    /// header, for plain fd-passing receivers; no answer is awaited.
    #[arg(long)]
    compat: bool,
    /// Give up waiting for the verdict after this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = parse_seconds)]
    answer_timeout: f64,
    /// A metadata entry sent with the transfer (protocol 1.1): KEY and a
    /// UTF-8 VALUE. Repeatable; entries keep command-line order. A transfer
    /// of metadata alone (no segment) is allowed.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    metas: Vec<(String, String)>,
    /// A metadata entry whose value is the bytes of the file at PATH (at
    /// most 60 KiB for all the metadata). Repeatable.
    #[arg(long = "meta-file", value_name = "KEY=PATH", value_parser = parse_meta_file)]
    meta_files: Vec<(String, PathBuf)>,
}

impl Cli {
    /// The socket path (present unless `--doctor`, which exits first).
    fn socket(&self) -> &Path {
        self.sockets.first().map_or(Path::new(""), PathBuf::as_path)
    }
}

const AFTER_HELP: &str = "\
Names: at most 249 bytes of UTF-8 without NUL, unique within the transfer;
0 to 253 segments in all, and at least one segment or metadata entry.

Metadata keys: 1 to 255 bytes without NUL, unique within the transfer; all
the metadata at most 61440 bytes encoded. A 1.0 receiver drops the metadata
of a transfer with segments and refuses one of metadata alone.

Seal names: seal, shrink, grow, write, future_write, exec (case-insensitive),
separated by ',' or '|'; 'none' for no seals.

Exit status: 0 accepted; 3 rejected by the receiver (the reason goes to
stderr); 2 usage error (found before any memfd is made or any connection
opened); 1 any other failure, 'delivery unknown' included (the receiver
vanished after the transfer was sent and before it answered). With several
--socket: 0 every receiver accepted; 4 some accepted and some did not; 3 none
accepted and every one refused; 1 otherwise.

Signals: SIGINT and SIGTERM end the sender at once. A transfer already sent
may still be delivered; its verdict is then unknown.

Logs: none. RUST_LOG is not read; errors go to stderr, with a hint where one
helps.";

fn parse_meta(spec: &str) -> Result<(String, String), String> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?}: expected KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

fn parse_meta_file(spec: &str) -> Result<(String, PathBuf), String> {
    let (key, path) = spec
        .split_once('=')
        .filter(|(_, path)| !path.is_empty())
        .ok_or_else(|| format!("{spec:?}: expected KEY=PATH"))?;
    Ok((key.to_owned(), PathBuf::from(path)))
}

/// Reads a --meta-file value, refusing one that could not fit the
/// metadata's limit before reading it all.
fn read_meta_file(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = fs::File::open(path)
        .map_err(|error| format!("--meta-file {key}={}: {error}", path.display()))?;
    let mut value = Vec::new();
    file.take(MAX_METADATA_LEN as u64 + 1)
        .read_to_end(&mut value)
        .map_err(|error| format!("--meta-file {key}={}: {error}", path.display()))?;
    if value.len() > MAX_METADATA_LEN {
        return Err(format!(
            "--meta-file {key}={}: more than the {MAX_METADATA_LEN} bytes all metadata may take",
            path.display()
        ));
    }
    Ok(value)
}

/// Where on the command line each value of the flag `id` stood, so that
/// values of different flags keep the order they were given in.
fn positions(matches: &clap::ArgMatches, id: &str) -> Vec<usize> {
    matches
        .indices_of(id)
        .map(Iterator::collect)
        .unwrap_or_default()
}

/// The metadata in command-line order, whichever flag each entry came from.
fn metadata(cli: &Cli, matches: &clap::ArgMatches) -> Result<Vec<(String, Vec<u8>)>, String> {
    let indices = |id: &str| positions(matches, id);
    let mut entries = Vec::new();
    for ((key, value), index) in cli.metas.iter().zip(indices("metas")) {
        entries.push((index, key.clone(), value.clone().into_bytes()));
    }
    for ((key, path), index) in cli.meta_files.iter().zip(indices("meta_files")) {
        entries.push((index, key.clone(), read_meta_file(key, path)?));
    }
    entries.sort_by_key(|(index, _, _)| *index);
    Ok(entries
        .into_iter()
        .map(|(_, key, value)| (key, value))
        .collect())
}

fn parse_name(name: &str) -> Result<String, String> {
    sealpass_proto::message::validate_name(0, name)
        .map(|()| name.to_owned())
        .map_err(|error| format!("segment name {name:?}: {error}"))
}

fn split_name<'a>(spec: &'a str, expected: &str) -> Result<(String, &'a str), String> {
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?}: expected {expected}"))?;
    Ok((parse_name(name)?, rest))
}

fn parse_file(spec: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = split_name(spec, "NAME=PATH")?;
    if path.is_empty() {
        return Err(format!("{spec:?}: expected NAME=PATH, with a path"));
    }
    Ok((name, PathBuf::from(path)))
}

fn parse_fill(spec: &str) -> Result<(String, u8, u64), String> {
    let (name, rest) = split_name(spec, "NAME=BYTE:SIZE")?;
    let (byte, size) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{spec:?}: expected NAME=BYTE:SIZE"))?;
    let size = parse_size(size).map_err(|error| format!("{spec:?}: {error}"))?;
    Ok((name, parse_byte(byte)?, size))
}

fn parse_byte(text: &str) -> Result<u8, String> {
    if let Some(hex) = text.strip_prefix("0x") {
        return u8::from_str_radix(hex, 16)
            .map_err(|_| format!("byte {text:?}: expected 0x00 to 0xff"));
    }
    match text.as_bytes() {
        [byte] => Ok(*byte),
        _ => Err(format!(
            "byte {text:?}: expected one ASCII character or 0xNN"
        )),
    }
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|value| Duration::try_from_secs_f64(*value).is_ok())
        .ok_or_else(|| format!("{text:?}: expected a number of seconds, 0 or more"))
}

enum Source {
    File(PathBuf),
    Fill { byte: u8, size: u64 },
    Stdin,
}

/// The segments in command-line order, whatever flag each came from, and
/// the metadata, checked against the protocol's rules (count, names and
/// keys unique, sizes) before any memfd is made.
fn sources(
    cli: &Cli,
    matches: &clap::ArgMatches,
) -> Result<(Vec<(String, Source)>, Metadata), String> {
    let indices = |id: &str| positions(matches, id);
    let mut sources = Vec::new();
    for ((name, path), index) in cli.files.iter().zip(indices("files")) {
        sources.push((index, name.clone(), Source::File(path.clone())));
    }
    for ((name, byte, size), index) in cli.fills.iter().zip(indices("fills")) {
        let source = Source::Fill {
            byte: *byte,
            size: *size,
        };
        sources.push((index, name.clone(), source));
    }
    if let (Some(name), Some(index)) = (&cli.stdin, indices("stdin").first()) {
        sources.push((*index, name.clone(), Source::Stdin));
    }
    let entries = metadata(cli, matches)?;
    if sources.is_empty() && entries.is_empty() {
        return Err(
            "nothing to send: give at least one --file, --fill, --stdin, --meta or --meta-file"
                .into(),
        );
    }
    if cli.sockets.len() > 1 && cli.compat {
        return Err("--compat sends to one receiver: give one --socket".into());
    }
    if cli.json && cli.sockets.len() < 2 {
        return Err("--json reports per receiver: give several --socket".into());
    }
    if cli.compat && !entries.is_empty() {
        return Err("--compat sends bare fds with no header: it carries no --meta".into());
    }
    sources.sort_by_key(|(index, _, _)| *index);
    // The protocol's own rules, as the receiver will apply them.
    let declared: Vec<Segment> = sources
        .iter()
        .map(|(_, name, _)| Segment::new(name.clone(), 0, Seals::empty()))
        .collect();
    let pairs = entries
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_slice()));
    validate_transfer(1, declared.iter(), pairs).map_err(|error| error.to_string())?;
    let sources = sources
        .into_iter()
        .map(|(_, name, source)| (name, source))
        .collect();
    // Built after the check, which saw repeated keys as they were given.
    Ok((sources, entries.into_iter().collect()))
}

fn seconds(value: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
}

/// `1 segment`, `2 segments`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Fails before any memfd is filled when nobody can be listening at `path`,
/// so a typo does not cost filling gigabytes first.
fn check_socket_path(path: &Path) -> anyhow::Result<()> {
    match fs::metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => Ok(()),
        Ok(_) => Err(anyhow::anyhow!(
            "{} is not a socket; expected the socket of a running sealpass-recv",
            path.display()
        )),
        Err(error) => Err(SendError::Connect {
            path: path.to_owned(),
            source: sealpass_kernel::fdpass::TransportError::Sys {
                op: sealpass_kernel::fdpass::Op::Connect,
                errno: Errno::from_raw(error.raw_os_error().unwrap_or(0)),
            },
        }
        .into()),
    }
}

/// Whether connecting failed because the receiver is not listening yet (no
/// socket, or nobody accepting), which `--connect-timeout` waits out.
fn receiver_not_up_yet(error: &SendError) -> bool {
    matches!(
        error,
        SendError::Connect { source, .. }
            if matches!(source.errno(), Some(Errno::ENOENT | Errno::ECONNREFUSED))
    )
}

/// What to do about a failure, where the cause suggests it.
fn hint(error: &anyhow::Error, cli: &Cli) -> Option<String> {
    let SendError::Connect { path, source } = error.downcast_ref::<SendError>()? else {
        return None;
    };
    let path = path.display();
    Some(match source.errno()? {
        Errno::ENOENT => format!(
            "no socket at {path}: start `sealpass-recv --socket {path}` first, \
             or pass --connect-timeout SECS to wait for it"
        ),
        Errno::ECONNREFUSED => format!(
            "a socket file is at {path} but nothing listens there: its receiver is gone \
             (a new sealpass-recv replaces the stale file)"
        ),
        Errno::EPROTOTYPE if cli.compat => format!(
            "the receiver at {path} speaks sealpass (SOCK_SEQPACKET), not bare fd passing: \
             drop --compat"
        ),
        Errno::EPROTOTYPE => format!(
            "the receiver at {path} listens on SOCK_STREAM: it runs in --compat mode \
             (or is not sealpass); pass --compat to send bare fds"
        ),
        Errno::EACCES | Errno::EPERM => format!(
            "permission denied at {path}: the socket's mode (sealpass-recv --mode) or a \
             directory on its path does not admit this user"
        ),
        _ => return None,
    })
}

fn run(cli: &Cli, sources: Vec<(String, Source)>, metadata: &Metadata) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let patience = seconds(cli.connect_timeout);
    if patience.is_none() {
        check_socket_path(cli.socket())?;
    }
    let pages = if cli.hugetlb {
        Pages::HugeTlb
    } else {
        Pages::Shmem
    };
    let mut segments = Vec::new();
    for (name, source) in sources {
        let builder = SealedSegment::builder(&name)
            .seals(cli.seals)
            .pages(pages)
            .stream_limit(cli.max_stream_size);
        let segment = match source {
            Source::File(path) => builder.file(&path)?,
            Source::Fill { byte, size } => builder.filled(byte, size)?,
            Source::Stdin => builder.reader(&mut io::stdin().lock())?,
        };
        segments.push(segment);
    }
    let prepared = started.elapsed();
    let bytes: u64 = segments.iter().map(SealedSegment::size).sum();

    if cli.sockets.len() > 1 {
        return fan_out(cli, &segments, metadata, prepared, bytes);
    }
    if cli.compat {
        sealpass_sender::send_bare(cli.socket(), &segments)?;
        println!(
            "sent {}, {bytes} bytes, no header (compat); prepared in {} us",
            count(segments.len(), "bare memfd"),
            prepared.as_micros()
        );
        return Ok(ExitCode::SUCCESS);
    }

    let mut sender = match (Sender::connect(cli.socket()), patience) {
        (Ok(sender), _) => sender,
        (Err(error), Some(patience)) if receiver_not_up_yet(&error) => {
            eprintln!(
                "sealpass-send: no receiver at {} yet; waiting up to {patience:?}",
                cli.socket().display()
            );
            Sender::connect_with_retry(cli.socket(), patience)?
        }
        (Err(error), _) => return Err(error.into()),
    };
    sender.set_answer_timeout(seconds(cli.answer_timeout))?;
    let handoff_started = Instant::now();
    let verdict = sender.send_with(&segments, metadata)?;
    let handoff = handoff_started.elapsed();
    match verdict {
        Verdict::Accepted { id } => {
            let entries = match metadata.len() {
                0 => String::new(),
                1 => ", 1 metadata entry".to_owned(),
                n => format!(", {n} metadata entries"),
            };
            println!(
                "accepted transfer {id}: {}, {bytes} bytes{entries}; prepared in {} us, handed off in {} us",
                count(segments.len(), "segment"),
                prepared.as_micros(),
                handoff.as_micros()
            );
            for segment in &segments {
                let pages = match segment.pages() {
                    Pages::HugeTlb => " (hugetlb pages)",
                    _ if cli.hugetlb => " (shmem pages: the hugetlb pool did not take it)",
                    _ => "",
                };
                println!(
                    "  {} {} bytes sealed {}{pages}",
                    segment.name(),
                    segment.size(),
                    segment.seals()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Rejected {
            id,
            reason,
            message,
        } => {
            let which = if id == 0 {
                "the receiver refused the transfer".to_owned()
            } else {
                format!("rejected transfer {id}")
            };
            eprintln!("sealpass-send: {which}: {reason}: {message}");
            Ok(ExitCode::from(3))
        }
        other => {
            eprintln!("sealpass-send: unexpected verdict {other:?}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `--socket` given more than once: the same segments to every receiver,
/// each verdict reported on its own. Exit 0 when every receiver accepted,
/// 4 when some did and some did not, 3 when none did and every one
/// answered (refused), 1 otherwise.
fn fan_out(
    cli: &Cli,
    segments: &[SealedSegment],
    metadata: &Metadata,
    prepared: Duration,
    bytes: u64,
) -> anyhow::Result<ExitCode> {
    if let Some(patience) = seconds(cli.connect_timeout) {
        let deadline = Instant::now() + patience;
        for socket in &cli.sockets {
            while fs::metadata(socket).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // Without --answer-timeout, a receiver that never answers would hold
    // the report of all the others: a minute is the default patience here.
    let patience = seconds(cli.answer_timeout).unwrap_or(Duration::from_secs(60));
    let started = Instant::now();
    let verdicts = sealpass_sender::fan_out(&cli.sockets, segments, metadata, patience);
    let handoff = started.elapsed();
    let (mut accepted, mut rejected) = (0, 0);
    let total = verdicts.len();
    for each in verdicts {
        let socket = each.socket.display().to_string();
        let line = match each.verdict {
            Ok(Verdict::Accepted { id }) => {
                accepted += 1;
                if !cli.json {
                    println!("accepted transfer {id} at {socket}");
                }
                serde_json::json!({"socket": socket, "verdict": "accepted", "id": id})
            }
            Ok(Verdict::Rejected {
                id,
                reason,
                message,
            }) => {
                rejected += 1;
                if !cli.json {
                    eprintln!(
                        "sealpass-send: {socket}: rejected transfer {id}: {reason}: {message}"
                    );
                }
                serde_json::json!({
                    "socket": socket, "verdict": "rejected", "id": id,
                    "reason": reason.name(), "code": reason.code(), "message": message,
                })
            }
            Ok(other) => {
                let error = format!("unexpected verdict {other:?}");
                if !cli.json {
                    eprintln!("sealpass-send: {socket}: {error}");
                }
                serde_json::json!({"socket": socket, "verdict": "failed", "error": error})
            }
            Err(error) => {
                // Each cause once, as main() prints an error.
                let error = format!("{:#}", anyhow::Error::from(error));
                if !cli.json {
                    eprintln!("sealpass-send: {socket}: error: {error}");
                }
                serde_json::json!({"socket": socket, "verdict": "failed", "error": error})
            }
        };
        if cli.json {
            println!("{line}");
        }
    }
    if !cli.json {
        println!(
            "{accepted} of {total} receivers accepted {}, {bytes} bytes; prepared in {} us, \
             handed off to all in {} us",
            count(segments.len(), "segment"),
            prepared.as_micros(),
            handoff.as_micros()
        );
    }
    Ok(if accepted == total {
        ExitCode::SUCCESS
    } else if accepted > 0 {
        ExitCode::from(4)
    } else if rejected == total {
        ExitCode::from(3)
    } else {
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    if cli.doctor {
        print!("{}", sealpass_kernel::host::Host::read());
        return ExitCode::SUCCESS;
    }
    let (sources, metadata) = match sources(&cli, &matches) {
        Ok(parsed) => parsed,
        Err(message) => Cli::command()
            .error(ErrorKind::ValueValidation, message)
            .exit(),
    };
    match run(&cli, sources, &metadata) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sealpass-send: error: {error:#}");
            if let Some(hint) = hint(&error, &cli) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}
