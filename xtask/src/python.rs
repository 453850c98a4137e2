//! `cargo xtask python`: builds the Python package (`crates/python`) into a
//! fresh virtual environment under `target/python/`, then runs its pytest
//! suite, checks its type stubs against the compiled module (mypy's
//! stubtest) and the examples against the stubs (mypy --strict), and runs
//! PROTOCOL.md's conformance suite against its example receiver and sender.
//! maturin, pytest, numpy and mypy come from the package index, into that
//! environment only.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::project::{self, run};

/// What the environment gets from the package index: the build backend
/// (1.9.4 is the first to tell pyo3 it builds an extension module), the
/// test runner, numpy (the tests and the benchmark use it) and mypy.
const PACKAGES: &[&str] = &[
    "maturin>=1.9.4,<2",
    "pytest>=7",
    "numpy>=1.26",
    "mypy>=1.10",
];

/// A virtual environment with the package installed.
pub(crate) struct Venv {
    dir: PathBuf,
}

impl Venv {
    /// Makes `target/python/venv` anew, installs [`PACKAGES`], builds the
    /// wheel (release) and installs it.
    pub(crate) fn fresh() -> anyhow::Result<Venv> {
        let base = project::target_dir().join("python");
        let dir = base.join("venv");
        let wheels = base.join("wheels");
        for old in [&dir, &wheels] {
            if old.exists() {
                std::fs::remove_dir_all(old)
                    .with_context(|| format!("removing {}", old.display()))?;
            }
        }
        run(Command::new("python3").args(["-m", "venv"]).arg(&dir)).context(
            "making a virtual environment (Debian needs python3-venv; .ci/run installs it)",
        )?;
        let venv = Venv { dir };
        venv.pip_install(PACKAGES)?;
        run(Command::new(venv.dir.join("bin/maturin"))
            .current_dir(project::root())
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(project::root().join("crates/python/Cargo.toml"))
            .arg("--out")
            .arg(&wheels))?;
        let wheel = std::fs::read_dir(&wheels)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
            .with_context(|| format!("maturin left no wheel in {}", wheels.display()))?;
        venv.pip_install(&[wheel.as_os_str()])?;
        Ok(venv)
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

pub(crate) fn run_task(args: &[String]) -> anyhow::Result<()> {
    if !args.is_empty() {
        anyhow::bail!("python takes no arguments; got {args:?}");
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
