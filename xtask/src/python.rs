//! `cargo xtask python`: builds the Python package (`crates/python`) into a
//! fresh virtual environment under `target/python/`, then runs its pytest
//! suite, checks its type stubs against the compiled module (mypy's
//! stubtest) and the examples against the stubs (mypy --strict), and runs
//! PROTOCOL.md's conformance suite against its example receiver and sender.
//! maturin, zig (the `ziglang` package), pytest, numpy and mypy come from
//! the package index, into that environment only.
//!
//! The wheel tested is the one users get, `cargo xtask python --wheel`:
//! release, stripped of debug info, linked by zig against glibc 2.17
//! (manylinux2014), and checked to need nothing newer.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::project::{self, run};

/// What the environment gets from the package index: the build backend
/// (1.9.4 is the first to tell pyo3 it builds an extension module), zig
/// (maturin links with it against an old glibc), the test runner, numpy
/// (the tests and the benchmark use it) and mypy.
const PACKAGES: &[&str] = &[
    "maturin>=1.9.4,<2",
    "ziglang>=0.13,<0.18",
    "pytest>=7",
    "numpy>=1.26",
    "mypy>=1.10",
];

/// The oldest glibc the wheel runs on: manylinux2014's.
const GLIBC: (u32, u32) = (2, 17);

/// A virtual environment with the package installed.
pub(crate) struct Venv {
    dir: PathBuf,
}

impl Venv {
    /// Makes `target/python/venv` anew, installs [`PACKAGES`], builds the
    /// wheel ([`Venv::build_wheel`]) and installs it.
    pub(crate) fn fresh() -> anyhow::Result<Venv> {
        let venv = Venv::tools()?;
        let wheel = venv.build_wheel()?;
        venv.pip_install(&[wheel.as_os_str()])?;
        Ok(venv)
    }

    /// `target/python/venv`, made anew, with [`PACKAGES`] only.
    fn tools() -> anyhow::Result<Venv> {
        let dir = project::target_dir().join("python/venv");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        run(Command::new("python3").args(["-m", "venv"]).arg(&dir)).context(
            "making a virtual environment (Debian needs python3-venv; .ci/run installs it)",
        )?;
        let venv = Venv { dir };
        venv.pip_install(PACKAGES)?;
        Ok(venv)
    }

    /// Builds the wheel users install into `target/python/wheels` (made
    /// anew): release, without debug info (`--strip`), linked by zig
    /// against glibc 2.17 (`manylinux2014`); then checks it
    /// ([`check_wheel`]) and returns its path.
    fn build_wheel(&self) -> anyhow::Result<PathBuf> {
        let wheels = project::target_dir().join("python/wheels");
        if wheels.exists() {
            std::fs::remove_dir_all(&wheels)
                .with_context(|| format!("removing {}", wheels.display()))?;
        }
        // maturin finds zig as `python3 -m ziglang`: this environment's.
        let path = std::env::join_paths(std::iter::once(self.dir.join("bin")).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))?;
        run(Command::new(self.dir.join("bin/maturin"))
            .current_dir(project::root())
            .env("PATH", path)
            .args(["build", "--release", "--strip", "--quiet", "--zig"])
            .args(["--compatibility", "manylinux2014", "--manifest-path"])
            .arg(project::root().join("crates/python/Cargo.toml"))
            .arg("--out")
            .arg(&wheels))?;
        let wheel = std::fs::read_dir(&wheels)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
            .with_context(|| format!("maturin left no wheel in {}", wheels.display()))?;
        check_wheel(self, &wheel)?;
        Ok(wheel)
    }

    /// `pip install` into this environment.
    fn pip_install(&self, what: &[impl AsRef<std::ffi::OsStr>]) -> anyhow::Result<()> {
        run(self
            .python()
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(what))
    }

    /// The environment's interpreter.
    pub(crate) fn python(&self) -> Command {
        let mut command = Command::new(self.interpreter());
        command.current_dir(project::root());
        command
    }

    /// Its path.
    pub(crate) fn interpreter(&self) -> PathBuf {
        self.dir.join("bin/python")
    }
}

/// Checks the wheel users get: tagged manylinux2014, its extension module
/// without debug info, every glibc symbol it needs at most
/// [`GLIBC`]'s, and no symbol left without a version but Python's own (a
/// glibc function called by a name glibc added later, such as
/// `memfd_create`, would be one, and would fail to load on an old glibc).
fn check_wheel(venv: &Venv, wheel: &std::path::Path) -> anyhow::Result<()> {
    let name = wheel.file_name().unwrap_or_default().to_string_lossy();
    anyhow::ensure!(
        name.contains(&format!("manylinux_{}_{}", GLIBC.0, GLIBC.1)),
        "the wheel {name} is not tagged manylinux_{}_{}",
        GLIBC.0,
        GLIBC.1
    );
    let unpacked = project::target_dir().join("python/wheel-check");
    let _ = std::fs::remove_dir_all(&unpacked);
    run(venv
        .python()
        .args(["-m", "zipfile", "-e"])
        .arg(wheel)
        .arg(&unpacked))?;
    let module = std::fs::read_dir(unpacked.join("sealpass"))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "so"))
        .context("the wheel holds no extension module")?;
    let size = std::fs::metadata(&module)?.len();
    let objdump = |flag: &str| -> anyhow::Result<String> {
        let output = Command::new("objdump")
            .arg(flag)
            .arg(&module)
            .output()
            .context("running objdump (binutils; .ci/run installs it)")?;
        anyhow::ensure!(output.status.success(), "objdump {flag} failed");
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let sections = objdump("-h")?;
    anyhow::ensure!(
        !sections.contains(".debug_"),
        "{} keeps debug info",
        module.display()
    );
    let mut newest = (0, 0);
    for line in objdump("-T")?.lines().filter(|line| line.contains("*UND*")) {
        let symbol = line.split_whitespace().last().unwrap_or_default();
        // A weak symbol may be missing: its caller looks first (Rust's std
        // does so for `statx`, `getrandom` and the like).
        let flags = line.split("*UND*").next().unwrap_or_default();
        if flags.split_whitespace().any(|flag| flag == "w") {
            continue;
        }
        match line.split_once("(GLIBC_") {
            Some((_, version)) => {
                let version = version.split(')').next().unwrap_or_default();
                let mut parts = version
                    .split('.')
                    .map(|part| part.parse::<u32>().unwrap_or(0));
                let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
                anyhow::ensure!(
                    found <= GLIBC,
                    "{symbol} needs glibc {}.{}; the wheel promises {}.{}",
                    found.0,
                    found.1,
                    GLIBC.0,
                    GLIBC.1
                );
                newest = newest.max(found);
            }
            None if line.contains("(") => {} // another library's version
            None => anyhow::ensure!(
                symbol.starts_with("Py") || symbol.starts_with("_Py"),
                "{symbol} is needed without a version: on a glibc older than the one it \
                 was built on it may be missing (call it by its system call number)"
            ),
        }
    }
    eprintln!(
        "  {name}: extension module {} KiB, no debug info, glibc {}.{} at most",
        size / 1024,
        newest.0,
        newest.1
    );
    Ok(())
}

pub(crate) fn run_task(args: &[String]) -> anyhow::Result<()> {
    match args {
        [] => {}
        [flag] if flag == "--wheel" => {
            let wheel = Venv::tools()?.build_wheel()?;
            println!("{}", wheel.display());
            return Ok(());
        }
        _ => anyhow::bail!("python takes only --wheel; got {args:?}"),
    }
    let venv = Venv::fresh()?;
    let (_, receiver) = project::build_binaries(false)?;
    let bin = receiver
        .parent()
        .context("the receiver binary has no directory")?
        .to_owned();
    eprintln!("  pytest crates/python/tests");
    run(venv.python().env("SEALPASS_BIN", bin).args([
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "crates/python/tests",
    ]))?;
    eprintln!("  the type stubs against the module, the examples against the stubs");
    run(venv
        .python()
        .current_dir(std::env::temp_dir()) // import the installed package, not the source tree
        .args(["-m", "mypy.stubtest", "sealpass", "--allowlist"])
        .arg(project::root().join("crates/python/stubtest-allowlist.txt")))?;
    // The examples, and README's Python blocks as a user copies them.
    let readme_blocks = project::target_dir().join("python/readme");
    // Only this run's blocks: a stale file would be checked too.
    let _ = std::fs::remove_dir_all(&readme_blocks);
    std::fs::create_dir_all(&readme_blocks)?;
    let readme = std::fs::read_to_string(project::root().join("README.md"))?;
    for (index, block) in readme.split("```python\n").skip(1).enumerate() {
        let code = block.split("```").next().unwrap_or_default();
        std::fs::write(readme_blocks.join(format!("block_{index}.py")), code)?;
    }
    run(venv
        .python()
        .args(["-m", "mypy", "--strict", "--cache-dir"])
        .arg(project::target_dir().join("python/mypy-cache"))
        .arg("crates/python/examples")
        .arg(&readme_blocks))?;
    // And what the stubs must refuse: a segment that is not a buffer.
    let refused = project::target_dir().join("python/refused.py");
    std::fs::write(
        &refused,
        "import sealpass\nsealpass.send(\"/tmp/s.sock\", {\"x\": 5})\n",
    )?;
    let checked = venv
        .python()
        .args(["-m", "mypy", "--strict", "--cache-dir"])
        .arg(project::target_dir().join("python/mypy-cache"))
        .arg(&refused)
        .output()?;
    let said = String::from_utf8_lossy(&checked.stdout);
    anyhow::ensure!(
        !checked.status.success() && said.contains("dict-item"),
        "the stubs let `send(path, {{\"x\": 5}})` through: {said}"
    );
    let examples = project::root().join("crates/python/examples");
    let program = |name: &str| {
        format!(
            "{} {}",
            venv.interpreter().display(),
            examples.join(name).display()
        )
    };
    eprintln!("  conformance of the Python example receiver and sender");
    crate::conformance::run(&[
        "--receiver".into(),
        program("receiver.py"),
        "--sender".into(),
        program("sender.py"),
    ])
}
