//! A certificate made for one test run, for TLS tests that put a TLS-terminating proxy in front
//! of a local server (the broker in `amqp::tls`, Postgres in `postgres::tls`). Each test makes
//! its own, in a directory of its own, removed when dropped.

use std::path::PathBuf;
use std::process::Command;

/// A self-signed certificate for `localhost` in a directory removed when dropped.
pub struct TestCert {
    dir: PathBuf,
}

impl TestCert {
    pub fn new() -> anyhow::Result<TestCert> {
        let dir =
            std::env::temp_dir().join(format!("whizbang-tls-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .output()
            .map_err(|e| anyhow::anyhow!("the openssl command is needed for this test: {e}"))?;
        anyhow::ensure!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(TestCert { dir })
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
