//! `[partitions]`: how streams are spread over instances.
//!
//! Owns the partition count, the per-instance limit, the lease and its heartbeat, and their
//! checks. It must not compute partitions or leases (the coordinator and the store do).

use super::{Checked, at_least_one, ensure, within};
use serde::Deserialize;

/// `[partitions]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionConfig {
    /// Streams are hashed into this many partitions, each processed in order by one instance
    /// at a time.
    pub partition_count: u32,
    /// Most partitions one instance leases at once.
    pub max_partitions_per_instance: u32,
    /// A lease not renewed for this long expires and another instance may take it over.
    pub lease_seconds: u64,
    /// How often leases are renewed; shorter than `lease_seconds`.
    pub heartbeat_seconds: u64,
    /// A partition actor with nothing to do for this long stops (it is started again by the
    /// partition's next job); 0: never.
    pub idle_actor_seconds: u64,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            partition_count: 10_000,
            max_partitions_per_instance: 100,
            lease_seconds: 300,
            heartbeat_seconds: 10,
            idle_actor_seconds: 60,
        }
    }
}

impl PartitionConfig {
    pub(super) fn validate(&self) -> Checked {
        within(
            "partitions.partition_count",
            self.partition_count.into(),
            1,
            1_000_000,
        )?;
        at_least_one(&[
            (
                "partitions.max_partitions_per_instance",
                self.max_partitions_per_instance.into(),
            ),
            ("partitions.heartbeat_seconds", self.heartbeat_seconds),
        ])?;
        ensure(
            self.lease_seconds > self.heartbeat_seconds,
            "partitions.lease_seconds",
            || {
                format!(
                    "must be longer than partitions.heartbeat_seconds ({}), got {}",
                    self.heartbeat_seconds, self.lease_seconds
                )
            },
        )
    }
}
