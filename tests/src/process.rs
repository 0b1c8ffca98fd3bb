//! Child processes: the workspace binaries, their logs, signals and exit codes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub use nix::sys::signal::Signal;

/// Path of a workspace binary of the same build profile as the running executable (a test
/// in `target/<profile>/deps/` or a tool in `target/<profile>/`).
///
/// # Panics
/// When the binary is not built (`cargo build --workspace --bins` first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    let candidates = [
        dir.join(name),
        dir.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    candidates
        .into_iter()
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is missing next to {}: build the binaries first (scripts/test.sh does: cargo build --workspace --bins)",
                exe.display()
            )
        })
}

/// A child process with its stderr lines collected.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every stderr line seen so far.
    pub seen: Vec<String>,
}

/// The key-encryption key every process of the tests runs with (`PII_KEK`).
pub use ledger_pii::testing::TEST_KEK;

impl Process {
    /// Starts `binary` with `args` and `env` (plus `LOG_FORMAT=json`), inheriting the rest of
    /// this process's environment.
    pub fn start(binary: &PathBuf, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(Command::new(binary), args, env)
    }

    /// Like [`Process::start`], but with nothing inherited from this process's environment.
    pub fn start_clean(binary: &PathBuf, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary);
        command.env_clear();
        Self::spawn(command, args, env)
    }

    fn spawn(mut command: Command, args: &[&str], env: &[(&str, &str)]) -> Self {
        command
            .args(args)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            // Tests run without API keys unless they set AUTH_MODE themselves (the auth
            // tests do; the admin API needs a key or ADMIN_TOKEN whatever this says).
            .env("AUTH_MODE", "disabled")
            // Every process that holds personal data needs the key-encryption key; the
            // tests share one (a test that checks a missing or wrong one overrides it).
            .env(ledger_pii::keyring::CURRENT_SETTING, TEST_KEK)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("binary starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`, up to `deadline`; returns it.
    pub async fn wait_for_line(&mut self, needle: &str, deadline: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let start = Instant::now();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "process ended before logging {needle:?}; it logged:\n{}",
                    self.seen.join("\n")
                ),
                Err(_) => panic!(
                    "no log line with {needle:?} within {deadline:?}; seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every stderr line logged so far, without waiting (lines still in the pipe are read
    /// first).
    pub fn lines_so_far(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    /// Collects the remaining stderr lines (after the process ended).
    pub async fn drain(&mut self) -> Vec<String> {
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
        {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("process still running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits")),
            signal,
        )
        .expect("signal sent");
    }

    /// Waits for the exit status, up to `deadline`.
    pub async fn exit_code(&mut self, deadline: Duration) -> i32 {
        let status = tokio::time::timeout(deadline, self.child.wait())
            .await
            .expect("process exits in time")
            .expect("wait works");
        status.code().unwrap_or(-1)
    }
}

/// Asks the OS for a free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `url` answers 200, up to `deadline`.
pub async fn wait_until_ready(url: &str, deadline: Duration) {
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(response) = client.get(url).send().await {
            if response.status() == 200 {
                return;
            }
        }
        assert!(
            start.elapsed() < deadline,
            "{url} not ready within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
