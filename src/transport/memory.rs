//! The in-process bus: topics fan out to durable-for-the-process subscriptions.
//!
//! Owns per-subscription queues with delivery tags, unsettled tracking (a released delivery, or
//! one held by a subscription that was dropped, is delivered again, first), and a dead-letter list for rejected deliveries. Like Service Bus, a
//! subscription receives what is published after it exists. It must not be used between
//! processes: it lives in one process's memory.

use super::*;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Default)]
struct SubscriptionQueue {
    state: Mutex<QueueState>,
    ready: Notify,
}

impl SubscriptionQueue {
    /// Appends a delivery after every one before it and wakes a receiver.
    fn push(&self, message: Result<Envelope, MalformedDelivery>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.next_arrival += 1;
        let arrival = st.next_arrival;
        st.ready.push_back((arrival, message));
        drop(st);
        self.ready.notify_one();
    }
}

#[derive(Default)]
struct QueueState {
    next_tag: u64,
    /// Arrival number of the next message: released messages go back to their place by it.
    next_arrival: u64,
    /// (arrival, message), in arrival order.
    ready: VecDeque<(u64, Result<Envelope, MalformedDelivery>)>,
    /// tag → (arrival, message).
    unsettled: HashMap<u64, (u64, Result<Envelope, MalformedDelivery>)>,
    dead: Vec<(Result<Envelope, MalformedDelivery>, String)>,
}

/// Subscriptions of one topic, by name, in creation order.
type Subscriptions = Vec<(String, Arc<SubscriptionQueue>)>;

/// The shared in-process bus (the embedded default transport): topics and their subscriptions'
/// queues. Clone the `Arc` into every runtime of the process that should talk over it.
#[derive(Default)]
pub struct MemoryBus {
    topics: Mutex<HashMap<String, Subscriptions>>,
}

impl MemoryBus {
    /// An empty bus; share the `Arc` between the runtimes that should talk.
    pub fn new() -> Arc<MemoryBus> {
        Arc::new(MemoryBus::default())
    }

    fn queue(&self, topic: &str, subscription: &str) -> Arc<SubscriptionQueue> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let subs = topics.entry(topic.to_string()).or_default();
        if let Some((_, q)) = subs.iter().find(|(name, _)| name == subscription) {
            return q.clone();
        }
        let q = Arc::new(SubscriptionQueue::default());
        subs.push((subscription.to_string(), q.clone()));
        q
    }

    /// Declares a subscription up front, so it collects messages before anyone receives.
    pub fn declare(&self, topic: &str, subscription: &str) {
        self.queue(topic, subscription);
    }

    /// Puts a delivery that cannot be decoded into every subscription of `topic` (tests of the
    /// consumer's handling of bad input).
    pub fn inject_malformed(&self, topic: &str, malformed: MalformedDelivery) {
        self.fan_out(topic, || Err(malformed.clone()));
    }

    /// Puts an envelope into every subscription of `topic` without going through a publisher
    /// (tests of redelivery: the same message twice).
    pub fn inject(&self, topic: &str, envelope: Envelope) {
        self.fan_out(topic, || Ok(envelope.clone()));
    }

    /// Rejected deliveries of a subscription with their reasons.
    pub fn dead_letters(&self, topic: &str, subscription: &str) -> Vec<(Option<String>, String)> {
        let q = self.queue(topic, subscription);
        let st = q.state.lock().unwrap_or_else(|p| p.into_inner());
        st.dead
            .iter()
            .map(|(m, reason)| {
                let id = match m {
                    Ok(e) => Some(e.message_id.to_string()),
                    Err(bad) => bad.message_id.clone(),
                };
                (id, reason.clone())
            })
            .collect()
    }

    /// Messages waiting or unsettled in a subscription.
    pub fn depth(&self, topic: &str, subscription: &str) -> usize {
        let q = self.queue(topic, subscription);
        let st = q.state.lock().unwrap_or_else(|p| p.into_inner());
        st.ready.len() + st.unsettled.len()
    }

    /// A delivery made by `message` for each subscription of `topic` (none made when nobody
    /// subscribes).
    fn fan_out(&self, topic: &str, message: impl Fn() -> Result<Envelope, MalformedDelivery>) {
        let subscribers: Vec<Arc<SubscriptionQueue>> = {
            let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            topics
                .get(topic)
                .map(|s| s.iter().map(|(_, q)| q.clone()).collect())
                .unwrap_or_default()
        };
        for q in subscribers {
            q.push(message());
        }
    }
}

/// The transport over a [`MemoryBus`].
#[derive(Clone)]
pub struct MemoryTransport {
    bus: Arc<MemoryBus>,
}

impl MemoryTransport {
    /// A transport on `bus`.
    pub fn new(bus: Arc<MemoryBus>) -> MemoryTransport {
        MemoryTransport { bus }
    }

    /// The bus it sends to and receives from.
    pub fn bus(&self) -> &Arc<MemoryBus> {
        &self.bus
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn publish(&self, topic: &str, envelope: &Envelope) -> Result<(), TransportError> {
        self.bus.fan_out(topic, || Ok(envelope.clone()));
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        _prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        Ok(Box::new(MemorySubscription {
            queue: self.bus.queue(topic, subscription),
            held: Vec::new(),
        }))
    }

    async fn check_topology(
        &self,
        _topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<(), TransportError> {
        // In process, declaring is checking: a subscription exists once named.
        for (topic, name) in subscriptions {
            self.bus.declare(topic, name);
        }
        Ok(())
    }
}

struct MemorySubscription {
    queue: Arc<SubscriptionQueue>,
    /// Tags delivered through this subscription and not settled through it: like a broker when
    /// a link closes, dropping the subscription puts them back for the next receiver.
    held: Vec<u64>,
}

impl SubscriptionQueue {
    /// Puts an unsettled delivery back at its place in arrival order (ahead of everything that
    /// arrived after it): releasing several deliveries must not reverse them.
    fn release(st: &mut QueueState, arrival: u64, message: Result<Envelope, MalformedDelivery>) {
        let at = st.ready.partition_point(|(a, _)| *a < arrival);
        st.ready.insert(at, (arrival, message));
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        let mut st = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut released = false;
        for tag in self.held.drain(..) {
            if let Some((arrival, message)) = st.unsettled.remove(&tag) {
                SubscriptionQueue::release(&mut st, arrival, message);
                released = true;
            }
        }
        drop(st);
        if released {
            self.queue.ready.notify_one();
        }
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        loop {
            let notified = self.queue.ready.notified();
            {
                let mut st = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
                if !st.ready.is_empty() {
                    let mut out = Vec::new();
                    while out.len() < max.max(1) {
                        let Some((arrival, message)) = st.ready.pop_front() else {
                            break;
                        };
                        st.next_tag += 1;
                        let tag = st.next_tag;
                        st.unsettled.insert(tag, (arrival, message.clone()));
                        self.held.push(tag);
                        out.push(Delivery { tag, message });
                    }
                    return Ok(out);
                }
            }
            notified.await;
        }
    }

    async fn settle(&mut self, tag: u64, settlement: Settlement) -> Result<(), TransportError> {
        self.held.retain(|t| *t != tag);
        let mut st = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some((arrival, message)) = st.unsettled.remove(&tag) else {
            return Ok(()); // settling twice is harmless
        };
        match settlement {
            Settlement::Accept => {}
            Settlement::Reject(reason) => st.dead.push((message, reason)),
            Settlement::Release => {
                SubscriptionQueue::release(&mut st, arrival, message);
                drop(st);
                self.queue.ready.notify_one();
            }
        }
        Ok(())
    }
}
