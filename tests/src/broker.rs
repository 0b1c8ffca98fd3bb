//! A real Kafka-protocol broker (tansu) per test: its own port and its own durable
//! (SQLite) storage in a temporary directory, so it can be stopped and started again with
//! its topics and messages intact.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Where the tansu binary is: `TANSU_BIN`, else `$HOME/.local/tansu/bin/tansu` (where
/// `scripts/test.sh` installs it), else `tansu` on the PATH.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(path);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let path = PathBuf::from(home).join(".local/tansu/bin/tansu");
        if path.exists() {
            return path;
        }
    }
    PathBuf::from("tansu")
}

/// A running (or stopped) broker.
#[derive(Debug)]
pub struct Broker {
    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub address: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker on a free port with fresh storage; returns once it accepts connections.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let address = format!("127.0.0.1:{}", crate::free_port());
        let mut broker = Self {
            address,
            dir,
            child: None,
        };
        broker.resume().await;
        broker
    }

    /// Starts the broker again on the same port and storage.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let url = format!("tcp://{}", self.address);
        let log = std::fs::File::create(self.dir.path().join("broker.log")).expect("log file");
        let child = Command::new(tansu_binary())
            .arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            .arg("--storage-engine")
            .arg("sqlite://tansu.db")
            // tansu reads a `.env` in its working directory: give it an empty one.
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start tansu ({}): {err}; scripts/test.sh installs it",
                    tansu_binary().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(&self.address).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "broker did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the broker (as a crash or an outage would).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }

    /// The broker's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }
}
