//! `cargo xtask vm`: the kernel-facing parts of the suite on the kernel most
//! users run, Debian 12's Linux 6.1, booted in qemu under TCG (no KVM
//! needed). 6.1 has no `MFD_NOEXEC_SEAL`, no `F_SEAL_EXEC`, no
//! `SO_PEERPIDFD`, and refuses shared read-only mappings of write-sealed
//! memfds, so the fallbacks written for those run here for real. With
//! `--backports` it boots the newest kernel Debian offers for Debian 12
//! instead (bookworm-backports; 6.12 when this was written), which has
//! `MFD_NOEXEC_SEAL` and `SO_PEERPIDFD` but not `SO_PASSRIGHTS` (6.16):
//! a combination neither 6.1 nor this machine's kernel shows.
//!
//! It installs what it needs with apt when missing (`qemu-system-x86`,
//! `busybox-static`), fetches the kernel package into `target/vm` without
//! installing it, builds an initramfs (busybox, the binaries and the shared
//! libraries they load, a static bare C peer), boots it, and reads the
//! results from the serial console:
//!
//! - the conformance suite against `sealpass-recv` and `sealpass-send`,
//! - the conformance suite against the async example receiver and sender,
//! - the demo (two 4 MiB memfds, every byte checked),
//! - compat mode against a bare C peer,
//! - `--doctor`,
//! - hugetlb memfds (`--hugetlb`, the sender's hugetlb unit test, a
//!   segment that takes the whole pool, a hostile one with nothing
//!   reserved), from a pool the guest's kernel command line sets aside
//!   (`hugepages=16`),
//! - the fd-passing unit tests (`kernel::fdpass`: `SO_PASSRIGHTS` unknown,
//!   so answers' fds arrive and are closed; `SO_PEERPIDFD` unknown), the
//!   pidfd test of `receiver/tests/owned.rs` (no pidfd, all else works),
//!   and `--json` saying `"pidfd":false`.
//!
//! It prints one line per step, then `vm: N passed, M failed`, and fails if
//! any step failed or the VM did not report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::project::{self, cargo};

/// The meta package whose kernel the VM boots: Debian 12's cloud kernel.
const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// How long the VM may take, boot to power-off.
const VM_BUDGET: Duration = Duration::from_secs(170);

/// Where a kernel comes from.
#[derive(Clone, Copy)]
pub(crate) enum Source {
    /// Debian 12's own kernel (6.1), from the machine's apt sources.
    Bookworm,
    /// The newest kernel Debian offers for Debian 12, from
    /// bookworm-backports (6.12 as of writing), through an apt state of its
    /// own: the machine's sources are not touched.
    Backports,
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let source = match args {
        [] => Source::Bookworm,
        [flag] if flag == "--backports" => Source::Backports,
        _ => bail!("usage: cargo xtask vm [--backports]; got {args:?}"),
    };
    boot_and_check(source)
}

/// Boots the kernel from `source` and runs the steps in it.
pub(crate) fn boot_and_check(source: Source) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_tools()?;
    let dir = project::target_dir().join("vm");
    std::fs::create_dir_all(&dir)?;
    let kernel = fetch_kernel(&dir, source)?;
    let binaries = build(&dir)?;
    let initramfs = dir.join("initramfs.cpio");
    write_initramfs(&initramfs, &binaries)?;
    eprintln!(
        "vm: booting {} ({:.0} s so far)",
        kernel.display(),
        started.elapsed().as_secs_f64()
    );
    let console = boot(&kernel, &initramfs)?;
    let report: Vec<&str> = console
        .lines()
        .filter_map(|line| {
            line.trim_end_matches('\r')
                .find("vm: ")
                .map(|at| &line[at..])
        })
        .collect();
    for line in &report {
        println!("{line}");
    }
    let summary = report
        .iter()
        .rev()
        .find_map(|line| parse_summary(line))
        .with_context(|| {
            format!(
                "the VM did not report; its console ended with:\n{}",
                tail(&console, 30)
            )
        })?;
    eprintln!("vm: done in {:.0} s", started.elapsed().as_secs_f64());
    ensure!(
        summary.1 == 0 && summary.0 > 0,
        "{} steps failed in the VM",
        summary.1
    );
    Ok(())
}

/// `vm: N passed, M failed`.
fn parse_summary(line: &str) -> Option<(usize, usize)> {
    let rest = line.strip_prefix("vm: ")?;
    let (passed, failed) = rest.split_once(" passed, ")?;
    Some((
        passed.parse().ok()?,
        failed.strip_suffix(" failed")?.parse().ok()?,
    ))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all.get(all.len().saturating_sub(lines)..)
        .unwrap_or_default()
        .join("\n")
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// qemu and a static busybox, from apt when missing (gcc comes with the
/// machine).
fn ensure_tools() -> anyhow::Result<()> {
    let busybox_static = Path::new("/bin/busybox").exists()
        && Command::new("sh")
            .args(["-c", "ldd /bin/busybox 2>&1 | grep -q 'not a dynamic'"])
            .status()
            .is_ok_and(|status| status.success());
    if have("qemu-system-x86_64") && busybox_static {
        return Ok(());
    }
    eprintln!("vm: installing qemu-system-x86 and busybox-static");
    project::run(Command::new("apt-get").args(["update", "-qq"]))?;
    project::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "qemu-system-x86",
                "busybox-static",
            ]),
    )
}

/// The kernel image of Debian 12's cloud kernel from `source`, fetched with
/// `apt-get download` and unpacked under `dir` (nothing is installed).
fn fetch_kernel(dir: &Path, source: Source) -> anyhow::Result<PathBuf> {
    let (unpacked, apt_options) = match source {
        Source::Bookworm => (dir.join("kernel"), Vec::new()),
        Source::Backports => {
            let state = dir.join("apt-backports");
            std::fs::create_dir_all(state.join("lists/partial"))?;
            let sources = state.join("sources.list");
            std::fs::write(
                &sources,
                "deb http://deb.debian.org/debian bookworm-backports main\n",
            )?;
            let options = vec![
                format!("Dir::Etc::SourceList={}", sources.display()),
                format!("Dir::Etc::SourceParts={}", state.join("none").display()),
                format!("Dir::State::Lists={}", state.join("lists").display()),
            ];
            (dir.join("kernel-backports"), options)
        }
    };
    if let Some(image) = find_vmlinuz(&unpacked) {
        return Ok(image);
    }
    let apt = |program: &str| {
        let mut command = Command::new(program);
        for option in &apt_options {
            command.args(["-o", option]);
        }
        command
    };
    let depends = |update: bool| -> anyhow::Result<Option<String>> {
        if update {
            project::run(apt("apt-get").args(["update", "-qq"]))?;
        }
        let output = apt("apt-cache")
            .args(["depends", KERNEL_PACKAGE])
            .output()?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| line.trim().strip_prefix("Depends: "))
            .filter(|name| name.starts_with("linux-image-"))
            .map(str::to_owned))
    };
    // A private apt state starts empty: read its index first.
    let package = match depends(matches!(source, Source::Backports))? {
        Some(package) => package,
        None => depends(true)?.with_context(|| format!("apt knows no {KERNEL_PACKAGE}"))?,
    };
    eprintln!("vm: fetching {package}");
    let downloads = unpacked.with_extension("downloads");
    std::fs::create_dir_all(&downloads)?;
    project::run(
        apt("apt-get")
            .args(["download", &package])
            .current_dir(&downloads),
    )?;
    let deb = std::fs::read_dir(&downloads)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&package))
        })
        .context("apt-get download left no package")?;
    project::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    find_vmlinuz(&unpacked).context("the kernel package holds no /boot/vmlinuz-*")
}

fn find_vmlinuz(unpacked: &Path) -> Option<PathBuf> {
    std::fs::read_dir(unpacked.join("boot"))
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

/// The programs that go into the VM, by the name they get there.
fn build(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    project::run(cargo().args([
        "build",
        "--quiet",
        "--locked",
        "--bins",
        "--examples",
        "-p",
        "sealpass-sender",
        "-p",
        "sealpass-receiver",
        "--all-features",
    ]))?;
    let debug = project::target_dir().join("debug");
    let bare = dir.join("bare_sender");
    project::run(
        Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&bare)
            .arg(project::root().join("xtask/peers/bare_sender.c")),
    )?;
    let kernel_tests = test_binary(&["-p", "sealpass-kernel", "--lib"])?;
    let owned_tests = test_binary(&["-p", "sealpass-receiver", "--test", "owned"])?;
    let sender_tests = test_binary(&["-p", "sealpass-sender", "--lib"])?;
    Ok(vec![
        ("kernel_tests".into(), kernel_tests),
        ("owned_tests".into(), owned_tests),
        ("sender_tests".into(), sender_tests),
        ("sealpass-recv".into(), debug.join("sealpass-recv")),
        ("sealpass-send".into(), debug.join("sealpass-send")),
        (
            "async_receiver".into(),
            debug.join("examples/async_receiver"),
        ),
        ("async_sender".into(), debug.join("examples/async_sender")),
        ("xtask".into(), std::env::current_exe()?),
        ("bare_sender".into(), bare),
    ])
}

/// Builds one test binary (`cargo test --no-run` with `selection`) and
/// returns its path, from cargo's JSON messages.
fn test_binary(selection: &[&str]) -> anyhow::Result<PathBuf> {
    let output = cargo()
        .args([
            "test",
            "--no-run",
            "--locked",
            "--all-features",
            "--message-format=json",
        ])
        .args(selection)
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(
        output.status.success(),
        "building the test binary {selection:?} failed"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        // The binaries built beside it for its tests to run are not it.
        .filter(|message| message.pointer("/profile/test") == Some(&serde_json::Value::Bool(true)))
        .filter_map(|message| message.get("executable")?.as_str().map(PathBuf::from))
        .next_back()
        .with_context(|| format!("cargo named no test binary for {selection:?}"))
}

/// The shared libraries `program` loads, with the loader, by `ldd`.
fn libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(program).output()?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// What the VM runs: each step a line `vm: PASS name` or `vm: FAIL name`
/// (with the end of its output), then the count.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /tmp
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
export PATH=/bin:/sealpass
ulimit -n 4096
echo "vm: kernel $(uname -r)"
pass=0
fail=0
step() {
    name=$1
    shift
    if "$@" > /tmp/step.log 2>&1; then
        echo "vm: PASS $name"
        pass=$((pass + 1))
    else
        echo "vm: FAIL $name"
        { grep -E 'FAIL|error|conformance:' /tmp/step.log || tail -n 25 /tmp/step.log; } | head -n 60 | sed 's/^/vm:   /'
        fail=$((fail + 1))
    fi
}
checked() {
    out=$1
    [ "$(wc -c < "$out")" = 8388608 ] || { echo "$out: $(wc -c < "$out") bytes"; return 1; }
    [ "$(head -c 4194304 "$out" | tr -d A | wc -c)" = 0 ] || { echo "shma is not all A"; return 1; }
    [ "$(tail -c 4194304 "$out" | tr -d B | wc -c)" = 0 ] || { echo "shmb is not all B"; return 1; }
}
demo() {
    sealpass-recv --socket /tmp/demo.sock --once --print > /tmp/demo.out &
    recv=$!
    sealpass-send --socket /tmp/demo.sock --connect-timeout 30 --fill shma=A:4MiB --fill shmb=B:4MiB || return 1
    wait $recv || return 1
    checked /tmp/demo.out
}
compat() {
    sealpass-recv --socket /tmp/bare.sock --compat --once --print > /tmp/bare.out &
    recv=$!
    tries=0
    until bare_sender /tmp/bare.sock 2> /dev/null; do
        tries=$((tries + 1))
        [ $tries -lt 100 ] || { echo "the bare peer never got through"; return 1; }
        sleep 0.1
    done
    wait $recv || return 1
    checked /tmp/bare.out
}
kernel_at_least() {
    release=$(uname -r)
    major=${release%%.*}
    rest=${release#*.}
    minor=${rest%%[!0-9]*}
    [ "$major" -gt "$1" ] || { [ "$major" -eq "$1" ] && [ "$minor" -ge "$2" ]; }
}
json_says_pidfd_as_the_kernel_can() {
    sealpass-recv --socket /tmp/json.sock --once --json > /tmp/json.out &
    recv=$!
    sealpass-send --socket /tmp/json.sock --connect-timeout 30 --fill a=A:4KiB || return 1
    wait $recv || return 1
    cat /tmp/json.out
    # SO_PEERPIDFD came with Linux 6.5.
    if kernel_at_least 6 5; then expected=true; else expected=false; fi
    grep -q "\"pidfd\":$expected" /tmp/json.out
}
# The kernel command line gives the VM a hugetlb pool (hugepages=16): a
# segment of whole huge pages takes it, a 3 MiB one falls back to shmem, and
# the receiver verifies and writes out both.
hugetlb() {
    grep HugePages_ /proc/meminfo
    mkdir -p /tmp/huge.d
    sealpass-recv --socket /tmp/huge.sock --once --out /tmp/huge.d &
    recv=$!
    sealpass-send --socket /tmp/huge.sock --connect-timeout 30 --hugetlb \
        --fill big=H:4MiB --fill odd=O:3MiB > /tmp/huge.log || { cat /tmp/huge.log; return 1; }
    wait $recv || return 1
    cat /tmp/huge.log
    grep -q '^  big 4194304 bytes .*(hugetlb pages)$' /tmp/huge.log || return 1
    grep -q '^  odd 3145728 bytes .*(shmem pages' /tmp/huge.log || return 1
    [ "$(wc -c < /tmp/huge.d/big)" = 4194304 ] && [ "$(tr -d H < /tmp/huge.d/big | wc -c)" = 0 ] || { echo "big is not 4 MiB of H"; return 1; }
    [ "$(wc -c < /tmp/huge.d/odd)" = 3145728 ] && [ "$(tr -d O < /tmp/huge.d/odd | wc -c)" = 0 ] || { echo "odd is not 3 MiB of O"; return 1; }
}
# A segment that takes the whole pool (16 pages) still goes through: the
# receiver's mapping (shared from 6.7, private before) reserves no pages of
# its own (README, --hugetlb).
hugetlb_whole_pool() {
    sealpass-recv --socket /tmp/whole.sock --once > /tmp/whole.recv 2>&1 &
    recv=$!
    sealpass-send --socket /tmp/whole.sock --connect-timeout 30 --hugetlb \
        --fill all=W:32MiB > /tmp/whole.log 2>&1
    status=$?
    cat /tmp/whole.log
    [ $status = 0 ] || { kill $recv; cat /tmp/whole.recv; return 1; }
    wait $recv && grep -q '^  all 33554432 bytes .*(hugetlb pages)$' /tmp/whole.log
}
# Waits up to 10 s for a receiver's socket to appear.
socket_up() {
    tries=0
    until [ -S "$1" ]; do
        tries=$((tries + 1))
        [ $tries -lt 100 ] || { echo "no socket at $1"; return 1; }
        sleep 0.1
    done
}
# Starts sealpass-recv with the given flags inside the 64 MiB memory cgroup
# /sys/fs/cgroup/recv, its output thrown away; sets $recv to its pid.
recv_in_cgroup() {
    sh -c 'echo $$ > /sys/fs/cgroup/recv/cgroup.procs && exec sealpass-recv "$@"' recv "$@" > /dev/null 2>/tmp/cgroup.recv &
    recv=$!
}
# 512 MiB of holes against a receiver in a 64 MiB memory cgroup: refused
# (Sparse) by default, and the receiver serves on; with --allow-sparse the
# receiver reads the holes (--print), they are charged to it, and it is
# OOM-killed (137): what the refusal prevents.
sparse_in_a_memory_cgroup() {
    mkdir -p /sys/fs/cgroup
    grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup || return 1
    echo +memory > /sys/fs/cgroup/cgroup.subtree_control || return 1
    mkdir -p /sys/fs/cgroup/recv
    echo 64M > /sys/fs/cgroup/recv/memory.max || return 1
    recv_in_cgroup --socket /tmp/sparse.sock --print
    socket_up /tmp/sparse.sock || return 1
    xtask hostile sparse --socket /tmp/sparse.sock --size 512MiB > /tmp/sparse.log
    cat /tmp/sparse.log
    grep -q '^Reject Sparse' /tmp/sparse.log || { cat /tmp/cgroup.recv; return 1; }
    sealpass-send --socket /tmp/sparse.sock --fill after=A:4KiB > /dev/null || { echo "the receiver does not serve on"; return 1; }
    kill $recv
    wait $recv || { echo "the default receiver exited $?"; return 1; }
    recv_in_cgroup --socket /tmp/allowing.sock --print --allow-sparse
    socket_up /tmp/allowing.sock || return 1
    xtask hostile sparse --socket /tmp/allowing.sock --size 512MiB
    wait $recv
    status=$?
    echo "with --allow-sparse the receiver exited $status"
    [ $status = 137 ]
}
# --out on a 1 MiB tmpfs: a transfer that does not fit is refused whole,
# nothing of it appears in DIR, and the receiver serves on.
out_on_a_full_tmpfs() {
    mkdir -p /tmp/tiny
    mount -t tmpfs -o size=1M tmpfs /tmp/tiny || return 1
    sealpass-recv --socket /tmp/tiny.sock --out /tmp/tiny 2> /tmp/tiny.recv &
    recv=$!
    socket_up /tmp/tiny.sock || return 1
    sealpass-send --socket /tmp/tiny.sock --fill a=A:512KiB --fill b=B:1MiB > /tmp/tiny.log 2>&1
    status=$?
    cat /tmp/tiny.log
    [ $status != 0 ] || { echo "a transfer too big for DIR was accepted"; return 1; }
    left=$(ls -A /tmp/tiny)
    [ -z "$left" ] || { echo "left in DIR: $left"; return 1; }
    sealpass-send --socket /tmp/tiny.sock --fill a=A:512KiB > /dev/null || return 1
    [ "$(ls -A /tmp/tiny)" = a ] || { echo "DIR holds: $(ls -A /tmp/tiny)"; return 1; }
    kill $recv
    wait $recv
}
# A receiver killed (-9) while it writes a 256 MiB segment into DIR leaves
# nothing there under a name.
out_after_kill_9() {
    mkdir -p /tmp/killed.d
    sealpass-recv --socket /tmp/killed.sock --out /tmp/killed.d 2> /dev/null &
    recv=$!
    socket_up /tmp/killed.sock || return 1
    sealpass-send --socket /tmp/killed.sock --fill big=K:256MiB > /dev/null 2>&1 &
    send=$!
    tries=0
    until ls -l /proc/$recv/fd 2> /dev/null | grep -q /tmp/killed.d; do
        tries=$((tries + 1))
        [ $tries -lt 1200 ] || { echo "the receiver never opened a file in DIR"; return 1; }
        sleep 0.05
    done
    kill -9 $recv
    wait $send
    left=$(ls -A /tmp/killed.d)
    echo "left in DIR after kill -9: [$left]"
    [ -z "$left" ] || { [ "$left" = big ] && [ "$(wc -c < /tmp/killed.d/big)" = 268435456 ]; }
}
# With vm.max_map_count=1000 (in this guest only), 24 senders at once of
# 253 segments of 4 KiB each: every transfer is accepted or refused with a
# reason (ResourceExhausted, ControlTruncated), the receiver does not abort,
# and it serves on.
out_of_mappings() {
    sysctl -w vm.max_map_count=1000 || return 1
    # Every segment mapped (none copied), so 4 KiB segments meet the limit.
    sealpass-recv --socket /tmp/maps.sock --copy-at-most 0 2> /tmp/maps.recv &
    recv=$!
    socket_up /tmp/maps.sock || return 1
    args=""
    i=0
    while [ $i -lt 253 ]; do
        args="$args --fill s$i=A:4KiB"
        i=$((i + 1))
    done
    senders=""
    for j in $(seq 1 24); do
        sealpass-send --socket /tmp/maps.sock --answer-timeout 60 $args > /tmp/maps.$j 2>&1 &
        senders="$senders $!"
    done
    for pid in $senders; do wait $pid; done
    sysctl -w vm.max_map_count=65530
    kill -0 $recv || { echo "the receiver died"; tail -n 20 /tmp/maps.recv; return 1; }
    refused=0
    for j in $(seq 1 24); do
        if grep -q 'accepted' /tmp/maps.$j; then continue; fi
        grep -qE 'ResourceExhausted|ControlTruncated' /tmp/maps.$j || { echo "sender $j:"; cat /tmp/maps.$j; return 1; }
        refused=$((refused + 1))
    done
    echo "$refused of 24 refused with a reason"
    [ $refused -gt 0 ] || { echo "nothing met the limit"; return 1; }
    sealpass-send --socket /tmp/maps.sock --fill after=A:4KiB > /dev/null || { echo "the receiver does not serve on"; return 1; }
    kill $recv
    wait $recv
}
# Runs a test binary and checks that it ran tests, not a filter matching none.
tests_ran() {
    "$@" > /tmp/tests.log 2>&1
    status=$?
    cat /tmp/tests.log
    [ $status = 0 ] && grep -q 'test result: ok\. [1-9][0-9]* passed' /tmp/tests.log
}
step fd-passing-unit-tests tests_ran kernel_tests fdpass:: memfd:: --test-threads 1
step peer-pidfd-as-the-kernel-can tests_ran owned_tests --exact a_transfer_names_its_sender_by_pidfd_where_the_kernel_can
step json-says-pidfd-as-the-kernel-can json_says_pidfd_as_the_kernel_can
step conformance-of-sealpass-recv-and-sealpass-send xtask conformance --receiver /sealpass/sealpass-recv --sender "/sealpass/sealpass-send --fill conformance=C:64KiB"
step conformance-of-the-async-receiver-and-sender xtask conformance --receiver /sealpass/async_receiver --sender /sealpass/async_sender
step demo demo
step compat-with-a-bare-c-peer compat
step doctor sealpass-recv --doctor
step sparse-memfd-in-a-memory-cgroup sparse_in_a_memory_cgroup
step out-on-a-full-tmpfs-is-all-or-nothing out_on_a_full_tmpfs
step out-after-kill-9-leaves-no-file out_after_kill_9
step out-of-mappings-is-refused-never-an-abort out_of_mappings
step writers-made-up-front-and-sealed-in-place tests_ran sender_tests writer
step hugetlb-taken-where-the-pool-has-room tests_ran sender_tests hugetlb
step hugetlb-segments-from-sealpass-send-to-sealpass-recv hugetlb
step hugetlb-segment-taking-the-whole-pool hugetlb_whole_pool
step hugetlb-memfd-with-nothing-reserved tests_ran owned_tests --exact a_hugetlb_memfd_with_nothing_reserved_is_mapped_with_room_or_refused_without
echo "vm: $pass passed, $fail failed"
poweroff -f
"#;

/// Writes the initramfs: an uncompressed cpio archive (newc), which the
/// kernel unpacks as its root.
fn write_initramfs(path: &Path, binaries: &[(String, PathBuf)]) -> anyhow::Result<()> {
    let mut archive = Newc::default();
    for dir in [
        "bin", "dev", "proc", "sys", "tmp", "sealpass", "lib", "lib64", "usr", "usr/lib",
    ] {
        archive.dir(dir);
    }
    archive.file("init", INIT.as_bytes(), 0o755);
    archive.file("bin/busybox", &std::fs::read("/bin/busybox")?, 0o755);
    let mut libs = std::collections::BTreeSet::new();
    for (name, binary) in binaries {
        let bytes =
            std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
        archive.file(&format!("sealpass/{name}"), &bytes, 0o755);
        libs.extend(libraries(binary)?);
    }
    for lib in libs {
        let inside = lib.to_string_lossy().trim_start_matches('/').to_owned();
        let mut parent = String::new();
        for part in Path::new(&inside).parent().into_iter().flat_map(Path::iter) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(&part.to_string_lossy());
            archive.dir(&parent);
        }
        let bytes = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
        archive.file(&inside, &bytes, 0o755);
    }
    std::fs::write(path, archive.finish())?;
    Ok(())
}

/// A cpio archive in the "new ASCII" format the kernel reads.
#[derive(Default)]
struct Newc {
    bytes: Vec<u8>,
    inode: u32,
    dirs: std::collections::BTreeSet<String>,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let mut header = String::from("070701");
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        for field in [
            self.inode,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ] {
            let _ = write!(header, "{field:08x}");
        }
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_owned()) {
            self.entry(name, 0o040755, &[]);
        }
    }

    fn file(&mut self, name: &str, data: &[u8], permissions: u32) {
        self.entry(name, 0o100000 | permissions, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

/// Boots the VM and returns what it printed on its serial console.
fn boot(kernel: &Path, initramfs: &Path) -> anyhow::Result<String> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            // Without CMPXCHG16B: this machine's qemu (10.0) corrupts
            // registers emulating the guest's `cmpxchg16b %gs:(...)` in the
            // SLUB fast path, and Linux 6.12 double-faulted in
            // kmem_cache_alloc in 2 boots of 6 (garbage in EFLAGS). Without
            // the instruction the kernel takes SLUB's locked path; 8 boots
            // of 8 passed.
            "-cpu",
            "qemu64,-cx16",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        // hugepages=16: a hugetlb pool of 32 MiB inside the guest, for the
        // MFD_HUGETLB steps, without touching this machine's pool.
        .args(["-append", "console=ttyS0 panic=-1 quiet hugepages=16"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut stdout = child.stdout.take().context("qemu's console")?;
    let reader = std::thread::spawn(move || {
        let mut console = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut console);
        console
    });
    let deadline = Instant::now() + VM_BUDGET;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let console = reader.join().unwrap_or_default();
            bail!(
                "the VM ran past {VM_BUDGET:?}; its console ended with:\n{}",
                tail(&String::from_utf8_lossy(&console), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = reader.join().unwrap_or_default();
    Ok(String::from_utf8_lossy(&console).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        assert_eq!(parse_summary("vm: 5 passed, 0 failed"), Some((5, 0)));
        assert_eq!(parse_summary("vm: 3 passed, 2 failed"), Some((3, 2)));
        assert_eq!(parse_summary("vm: PASS demo"), None);
    }
}
