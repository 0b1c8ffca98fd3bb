//! Apache Kafka for the end-to-end tests.
//!
//! - [`Broker::shared`]: the run's one broker, started once by `scripts/test.sh` (its address
//!   in `LEDGER_TEST_KAFKA`). Tests share it and keep apart by topic and consumer group: see
//!   [`crate::services::topic`]. Without that variable (a test run by hand with plain
//!   `cargo test`), a broker of the test's own is started instead.
//! - [`Broker::start`]: a broker of the test's own, for a test that stops or kills it (an
//!   outage, a restart). It is a child of the test, single-node KRaft, on free loopback ports,
//!   with its data in a temporary directory so it restarts with its topics and messages.
//!
//! Both are started through `scripts/kafka.sh`, which installs Kafka from Maven Central
//! once per machine. A test that panics prints the tail of its broker's log.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::process::{Child, Command};

/// The environment variable naming the shared broker's address.
pub const SHARED_BROKER_VAR: &str = "LEDGER_TEST_KAFKA";
/// The environment variable naming the shared broker's log file.
pub const SHARED_LOG_VAR: &str = "LEDGER_TEST_KAFKA_LOG";

/// `scripts/kafka.sh` of this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka.sh")
}

/// A broker, running or stopped.
#[derive(Debug)]
pub struct Broker {
    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub address: String,
    own: Option<Own>,
    log_path: Option<PathBuf>,
}

#[derive(Debug)]
struct Own {
    dir: tempfile::TempDir,
    port: u16,
    controller_port: u16,
    child: Option<Child>,
}

impl Broker {
    /// The run's shared broker (or, outside `scripts/test.sh`, one of this test's own).
    pub async fn shared() -> Self {
        match std::env::var(SHARED_BROKER_VAR) {
            Ok(address) if !address.is_empty() => Self {
                address,
                own: None,
                log_path: std::env::var_os(SHARED_LOG_VAR).map(PathBuf::from),
            },
            _ => Self::start().await,
        }
    }

    /// Starts a broker of this test's own on free ports with fresh storage; returns once it
    /// answers a metadata request.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = crate::free_port();
        let mut controller_port = crate::free_port();
        while controller_port == port {
            controller_port = crate::free_port();
        }
        let log_path = dir.path().join("broker.log");
        let mut broker = Self {
            address: format!("127.0.0.1:{port}"),
            own: Some(Own {
                dir,
                port,
                controller_port,
                child: None,
            }),
            log_path: Some(log_path),
        };
        broker.resume().await;
        broker
    }

    /// Starts this test's broker again on the same ports and storage.
    ///
    /// # Panics
    /// On the shared broker, which no test may stop.
    pub async fn resume(&mut self) {
        let own = self
            .own
            .as_mut()
            .expect("only a test's own broker can be restarted");
        assert!(own.child.is_none(), "broker already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(own.dir.path().join("broker.log"))
            .expect("log file");
        let child = Command::new("bash")
            .arg(script())
            .arg("exec")
            .arg(own.dir.path())
            .arg(own.port.to_string())
            .arg(own.controller_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("cannot run scripts/kafka.sh");
        own.child = Some(child);
        let address = self.address.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let probe = address.clone();
            let up = tokio::task::spawn_blocking(move || answers_metadata(&probe))
                .await
                .unwrap_or(false);
            if up {
                break;
            }
            let exited = self
                .own
                .as_mut()
                .and_then(|own| own.child.as_mut())
                .and_then(|child| child.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "broker did not start ({exited:?}): {}",
                self.log_tail(60)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills this test's broker (as a crash or an outage would).
    ///
    /// # Panics
    /// On the shared broker.
    pub async fn stop(&mut self) {
        let own = self
            .own
            .as_mut()
            .expect("only a test's own broker can be stopped");
        if let Some(mut child) = own.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }

    /// The last `lines` lines of the broker's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self
            .log_path
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let shared = if self.own.is_none() {
                " (shared by the run)"
            } else {
                ""
            };
            // The test failed: its broker's view helps to tell why.
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "--- last lines of the Kafka broker's log at {}{shared} ---\n{}\n---",
                    self.address,
                    self.log_tail(40)
                );
            }
        }
    }
}

/// Whether a broker at `address` answers a metadata request.
pub fn answers_metadata(address: &str) -> bool {
    let Ok(consumer) = ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("log_level", "0")
        .create::<BaseConsumer>()
    else {
        return false;
    };
    consumer
        .fetch_metadata(None, Duration::from_secs(2))
        .is_ok_and(|metadata| !metadata.brokers().is_empty())
}
