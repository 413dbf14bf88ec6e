//! `[routing]`: which message types leave this service, and which topics it consumes.
//!
//! Owns the type → topic map and the subscription list, and their checks. It must not route
//! anything (the registry and the dispatcher do).

use super::{Checked, ensure};
use serde::Deserialize;
use std::collections::BTreeMap;

/// A subscription this service consumes: every event published to `topic` reaches this
/// service's inbox once, under the subscription `name`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// The topic consumed.
    pub topic: String,
    /// The subscription's name on that topic.
    pub name: String,
}

/// `[routing]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Message type name → destination topic. A type without an entry stays in this service.
    pub topics: BTreeMap<String, String>,
    /// Topics this service consumes.
    pub subscriptions: Vec<SubscriptionConfig>,
}

impl RoutingConfig {
    pub(super) fn validate(&self) -> Checked {
        for (ty, topic) in &self.topics {
            ensure(
                !topic.trim().is_empty(),
                &format!("routing.topics.{ty}"),
                || "topic must not be empty".into(),
            )?;
        }
        for (i, sub) in self.subscriptions.iter().enumerate() {
            ensure(
                !sub.topic.trim().is_empty() && !sub.name.trim().is_empty(),
                &format!("routing.subscriptions[{i}]"),
                || "topic and name must not be empty".into(),
            )?;
        }
        Ok(())
    }
}
