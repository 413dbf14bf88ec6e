//! The one log subscriber of the test process: everything the runtimes log (at warn and above,
//! or what `RUST_LOG` asks for) goes into one buffer that tests search for the reasons the
//! runtime gives. With `WHIZBANG_TEST_SHOW_LOGS` set, every line is also written to stderr.
//!
//! A process has one global subscriber and every case of the crate shares it, so the buffer
//! holds the lines of every test running at the same time: a test must pick its own lines by
//! something only it uses (its topic, a message id), never count or forbid lines by a phrase
//! alone. Nothing else in the crate may install a subscriber.

use std::sync::{Arc, Mutex, OnceLock};

/// The shared log buffer, installing the subscriber on first use.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .try_init();
        buffer
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        if std::env::var_os("WHIZBANG_TEST_SHOW_LOGS").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured log lines that contain `needle`.
pub fn log_lines_with(logs: &Arc<Mutex<Vec<u8>>>, needle: &str) -> Vec<String> {
    String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}
