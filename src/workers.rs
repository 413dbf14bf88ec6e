//! The threads an instance runs its users' handlers on.
//!
//! Owns `runtime.worker_threads` arbiters (an actix event loop on a thread of its own each) for
//! the partition actors, which run the receptors and perspectives. A partition's actor always
//! lives on the same worker (`partition % workers`), so handlers of different partitions run in
//! parallel on different cores while each stream stays strictly in order. The coordinator
//! (heartbeat, lease renewal, work batches, and so the store's connections), the publisher, the
//! consumers and the dispatcher stay on the arbiter that started the runtime, where a handler
//! that burns CPU or blocks its thread cannot starve them.
//!
//! It must not decide what runs where beyond that mapping, nor hold any actor state.

use actix::prelude::*;

/// The worker arbiters of one runtime; stopped by [`Workers::stop`] (the runtime's shutdown).
pub(crate) struct Workers {
    arbiters: Vec<Arbiter>,
}

/// Where each partition's actor is started.
#[derive(Clone)]
pub(crate) struct Placement {
    workers: Vec<ArbiterHandle>,
}

impl Placement {
    /// The arbiter the actor of `partition` lives on.
    pub(crate) fn partition(&self, partition: u32) -> &ArbiterHandle {
        &self.workers[partition as usize % self.workers.len()]
    }
}

impl Workers {
    /// Starts `worker_threads` arbiters (0: one per core the process may use).
    pub(crate) fn start(worker_threads: u32) -> std::io::Result<Workers> {
        let n = match worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        Ok(Workers {
            arbiters: (0..n)
                .map(|_| Arbiter::try_new())
                .collect::<Result<_, _>>()?,
        })
    }

    /// Where the partition actors are started.
    pub(crate) fn placement(&self) -> Placement {
        Placement {
            workers: self.arbiters.iter().map(Arbiter::handle).collect(),
        }
    }

    /// Stops every worker: the partition actors on them end with them.
    pub(crate) fn stop(&self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}
