//! `cargo xtask conformance [--receiver 'CMD ...'] [--sender 'CMD ...']`:
//! checks any receiver or sender executable against PROTOCOL.md.
//!
//! A receiver is started once, with `--socket PATH` appended, and scripted
//! senders run every case against it. After each case it must still accept
//! a valid transfer, and its open-fd count (from `/proc/PID/fd`) must return
//! to its baseline. A sender is started once per scenario with `--socket
//! PATH` appended, and must send one valid transfer, then exit 0 on `Ack`
//! and nonzero otherwise. CMD is split on whitespace (no shell quoting).
//! With neither flag, this project's own binaries are checked.

mod receiver;
mod sender;

use anyhow::bail;

use crate::project::{self, Scratch};

/// Results, one line per case.
pub(crate) struct Report {
    passed: usize,
    failed: Vec<String>,
    quiet: bool,
}

impl Report {
    /// The names of the cases that failed.
    pub(crate) fn failed(&self) -> &[String] {
        &self.failed
    }
}

impl Report {
    fn record(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                if !self.quiet {
                    println!("PASS {name}");
                }
            }
            Err(why) => {
                if !self.quiet {
                    println!("FAIL {name}: {why}");
                }
                self.failed.push(name.to_owned());
            }
        }
    }
}

fn words(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_owned).collect()
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut receiver = None;
    let mut sender = None;
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().map(|v| words(v));
        match (flag.as_str(), value) {
            ("--receiver", Some(command)) if !command.is_empty() => receiver = Some(command),
            ("--sender", Some(command)) if !command.is_empty() => sender = Some(command),
            _ => {
                bail!("usage: cargo xtask conformance [--receiver 'CMD ...'] [--sender 'CMD ...']")
            }
        }
    }
    if receiver.is_none() && sender.is_none() {
        let (send, recv) = project::build_binaries(false)?;
        receiver = Some(vec![recv.display().to_string()]);
        sender = Some(vec![
            send.display().to_string(),
            "--fill".into(),
            "conformance=C:64KiB".into(),
        ]);
    }
    let report = check(receiver, sender, false)?;
    if !report.failed.is_empty() {
        bail!("{} conformance cases failed", report.failed.len());
    }
    Ok(())
}

/// Runs the cases for whichever of the two commands is given, printing a
/// line per case and a closing count unless `quiet`.
pub(crate) fn check(
    receiver: Option<Vec<String>>,
    sender: Option<Vec<String>>,
    quiet: bool,
) -> anyhow::Result<Report> {
    let scratch = Scratch::new("conformance")?;
    let mut report = Report {
        passed: 0,
        failed: Vec::new(),
        quiet,
    };
    let say = |line: String| {
        if !quiet {
            println!("{line}");
        }
    };
    if let Some(command) = receiver {
        say(format!("receiver under test: {}", command.join(" ")));
        if let Err(error) = receiver::check(&command, scratch.path(), &mut report) {
            report.record(
                "receiver/starts-and-accepts-a-valid-transfer",
                Err(format!("{error:#}")),
            );
        }
        for (reason, why) in sealpass_receiver::conformance::NOT_PROVOKED {
            say(format!("note: {reason} is not provoked: {why}"));
        }
    }
    if let Some(command) = sender {
        say(format!("sender under test: {}", command.join(" ")));
        sender::check(&command, scratch.path(), &mut report);
    }
    say(format!(
        "conformance: {} passed, {} failed",
        report.passed,
        report.failed.len()
    ));
    Ok(report)
}
