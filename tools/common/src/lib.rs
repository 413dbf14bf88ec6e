//! What the measuring tools (`whizbang-bench`, `whizbang-chaos`) share: where the repository
//! and its `target/` directory are, and declaring the broker topology their runs make
//! (`amqp_topology`). Not part of the library and never published; nothing here may be needed
//! by a service that uses whizbang.

pub mod amqp_topology;

use std::path::{Path, PathBuf};

/// The repository's root (the workspace), where `scripts/`, `config/` and `schema/` live.
/// Taken from where this crate was built, so a tool finds the scripts whatever its working
/// directory.
pub fn workspace_root() -> PathBuf {
    // This crate sits at `<root>/tools/common`.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// The workspace's target directory (`$CARGO_TARGET_DIR`, else `<root>/target`): where the
/// tools write their results (`bench/results.json`, `chaos/results.json`) and logs.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
