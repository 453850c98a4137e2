//! `sealpass-send`: put bytes into sealed memfds and hand them, in one
//! message, to a `sealpass-recv`.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser};
use sealpass_proto::Seals;
use sealpass_sender::{SealedSegment, Sender, Verdict, parse_size};

/// Hand buffers to a receiver as sealed memfds: zero copies, verified by the
/// kernel. All segments go in one message, in the order given.
///
/// Exit status: 0 accepted, 3 rejected by the receiver, 2 usage error, 1 any other failure.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The receiver's socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// A segment named NAME holding the bytes of the file at PATH.
    #[arg(long = "file", value_name = "NAME=PATH")]
    files: Vec<String>,
    /// A segment named NAME of SIZE bytes, each BYTE (a character, or 0xNN).
    /// SIZE takes 4194304, 0x400000, 4M or 4MiB.
    #[arg(long = "fill", value_name = "NAME=BYTE:SIZE")]
    fills: Vec<String>,
    /// A segment named NAME holding everything read from stdin.
    #[arg(long = "stdin", value_name = "NAME")]
    stdins: Vec<String>,
    /// Seals to apply to every segment.
    #[arg(long, value_name = "LIST", default_value = "shrink,grow,write,seal")]
    seals: Seals,
    /// Keep retrying the connection for this many seconds while the receiver starts.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    connect_timeout: f64,
    /// Send bare fds over SOCK_STREAM with a 256-byte zero payload and no
    /// header, for plain fd-passing receivers; no answer is awaited.
    #[arg(long)]
    compat: bool,
    /// Give up waiting for the verdict after this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    answer_timeout: f64,
}

enum Source {
    File(PathBuf),
    Fill { byte: u8, size: u64 },
    Stdin,
}

fn split_name<'a>(flag: &str, spec: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    spec.split_once('=')
        .with_context(|| format!("--{flag} {spec:?}: expected NAME=..."))
}

fn parse_byte(text: &str) -> anyhow::Result<u8> {
    if let Some(hex) = text.strip_prefix("0x") {
        return u8::from_str_radix(hex, 16)
            .with_context(|| format!("byte {text:?}: expected 0x00 to 0xff"));
    }
    match text.as_bytes() {
        [byte] => Ok(*byte),
        _ => bail!("byte {text:?}: expected one ASCII character or 0xNN"),
    }
}

/// The segments in command-line order, whatever flag each came from.
fn sources(cli: &Cli, matches: &clap::ArgMatches) -> anyhow::Result<Vec<(usize, String, Source)>> {
    let indices = |id: &str| -> Vec<usize> {
        matches
            .indices_of(id)
            .map(Iterator::collect)
            .unwrap_or_default()
    };
    let mut sources = Vec::new();
    for (spec, index) in cli.files.iter().zip(indices("files")) {
        let (name, path) = split_name("file", spec)?;
        sources.push((index, name.to_owned(), Source::File(path.into())));
    }
    for (spec, index) in cli.fills.iter().zip(indices("fills")) {
        let (name, rest) = split_name("fill", spec)?;
        let (byte, size) = rest
            .rsplit_once(':')
            .with_context(|| format!("--fill {spec:?}: expected NAME=BYTE:SIZE"))?;
        let source = Source::Fill {
            byte: parse_byte(byte)?,
            size: parse_size(size)?,
        };
        sources.push((index, name.to_owned(), source));
    }
    if cli.stdins.len() > 1 {
        bail!(
            "--stdin given {} times; stdin can fill one segment",
            cli.stdins.len()
        );
    }
    for (name, index) in cli.stdins.iter().zip(indices("stdins")) {
        sources.push((index, name.clone(), Source::Stdin));
    }
    if sources.is_empty() {
        bail!("nothing to send: give at least one --file, --fill or --stdin");
    }
    sources.sort_by_key(|(index, _, _)| *index);
    Ok(sources)
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Option<Duration>> {
    if value == 0.0 {
        return Ok(None);
    }
    Duration::try_from_secs_f64(value)
        .map(Some)
        .with_context(|| format!("--{flag} {value}: expected a number of seconds"))
}

fn run(cli: &Cli, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut segments = Vec::new();
    for (_, name, source) in sources(cli, matches)? {
        let segment = match source {
            Source::File(path) => SealedSegment::from_file(&name, &path, cli.seals)?,
            Source::Fill { byte, size } => SealedSegment::filled(&name, byte, size, cli.seals)?,
            Source::Stdin => SealedSegment::from_reader(&name, &mut io::stdin().lock(), cli.seals)?,
        };
        segments.push(segment);
    }
    let prepared = started.elapsed();
    let bytes: u64 = segments.iter().map(SealedSegment::size).sum();

    if cli.compat {
        sealpass_sender::send_bare(&cli.socket, &segments)?;
        println!(
            "sent {} bare memfds, {bytes} bytes, no header (compat); prepared in {} us",
            segments.len(),
            prepared.as_micros()
        );
        return Ok(ExitCode::SUCCESS);
    }

    let mut sender = match seconds(cli.connect_timeout, "connect-timeout")? {
        Some(patience) => Sender::connect_with_retry(&cli.socket, patience)?,
        None => Sender::connect(&cli.socket)?,
    };
    sender.set_answer_timeout(seconds(cli.answer_timeout, "answer-timeout")?)?;
    let handoff_started = Instant::now();
    let verdict = sender.send(&segments)?;
    let handoff = handoff_started.elapsed();
    match verdict {
        Verdict::Accepted { id } => {
            println!(
                "accepted transfer {id}: {} segments, {bytes} bytes; prepared in {} us, handed off in {} us",
                segments.len(),
                prepared.as_micros(),
                handoff.as_micros()
            );
            for segment in &segments {
                println!(
                    "  {} {} bytes sealed {}",
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
            eprintln!("sealpass-send: rejected transfer {id}: {reason}: {message}");
            Ok(ExitCode::from(3))
        }
        other => {
            eprintln!("sealpass-send: unexpected verdict {other:?}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match run(&cli, &matches) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sealpass-send: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
