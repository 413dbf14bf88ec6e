//! The registry actor: message-type name → the one receptor of a command type, the perspectives
//! of an event type, and the destination topic.
//!
//! Owns registration (a second receptor for one command type is an error) and publishes an
//! immutable snapshot of its table through a `RegistryView` so that the dispatcher, partition
//! and consumer actors resolve handlers without a round trip per message. It must not run user
//! code: partition actors run the handlers it resolves (see `handler::ReceptorHandle`).

use crate::envelope::MessageKind;
use crate::handler::{
    ErasedPerspective, ErasedReceptor, PerspectiveAdapter, PerspectiveHandle, ReceptorAdapter,
    ReceptorHandle,
};
use crate::message::{self, Command, Event};
use crate::read_model::{
    Consistency, ErasedReadModel, ReadModel, ReadModelAdapter, ReadModelHandle,
};
use crate::supervision::{ActorKind, Lifeline, fault};
use crate::telemetry::{HandlerMeters, Meters};
use crate::{Perspective, Receptor};
use actix::prelude::*;
use foldhash::HashMap;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Checks that a payload decodes as its declared type (used to reject bad deliveries early).
pub(crate) type DecodeCheck = fn(&[u8]) -> Result<(), String>;

/// Why a handler could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A command type has exactly one receptor.
    #[error("a receptor for command type `{0}` is already registered")]
    DuplicateReceptor(String),
    /// Perspective names are unique per event type.
    #[error("perspective `{name}` is already registered for event type `{event_type}`")]
    DuplicatePerspective {
        /// The perspective's name.
        name: String,
        /// The event type it was registered for.
        event_type: String,
    },
    /// One type name cannot be both a command and an event.
    #[error("`{0}` is registered as both a command and an event type")]
    KindClash(String),
}

#[derive(Clone)]
pub(crate) struct ReceptorEntry {
    pub handle: ReceptorHandle,
    /// Its run times (`whizbang_receptor_duration_seconds`).
    pub meters: HandlerMeters,
    /// The receptor itself, for encoding and decoding its results (idempotent commands).
    pub receptor: Arc<dyn ErasedReceptor>,
}

#[derive(Clone)]
pub(crate) struct PerspectiveEntry {
    pub name: String,
    pub run: PerspectiveRun,
    /// Its run times (`whizbang_perspective_duration_seconds`).
    pub meters: HandlerMeters,
}

/// How a registered perspective runs.
#[derive(Clone)]
pub(crate) enum PerspectiveRun {
    /// A [`Perspective`]: its effects are its own, at least once.
    Plain(PerspectiveHandle),
    /// A [`crate::ReadModel`]: in the store transaction that records its progress.
    Once {
        handle: ReadModelHandle,
        consistency: Consistency,
    },
}

impl PerspectiveEntry {
    /// Whether it runs inside the command's transaction.
    pub fn inline(&self) -> bool {
        matches!(
            self.run,
            PerspectiveRun::Once {
                consistency: Consistency::Inline,
                ..
            }
        )
    }
}

/// One snapshot of the registry.
#[derive(Clone, Default)]
pub(crate) struct RegistryTable {
    receptors: HashMap<String, ReceptorEntry>,
    perspectives: HashMap<String, Vec<PerspectiveEntry>>,
    kinds: HashMap<String, (MessageKind, DecodeCheck)>,
    topics: BTreeMap<String, String>,
}

impl RegistryTable {
    pub fn receptor(&self, command_type: &str) -> Option<&ReceptorEntry> {
        self.receptors.get(command_type)
    }

    pub fn perspectives(&self, event_type: &str) -> &[PerspectiveEntry] {
        self.perspectives
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Every registration of the perspective `name`: (event type, how it runs).
    pub fn perspectives_named(&self, name: &str) -> Vec<(String, PerspectiveRun)> {
        self.perspectives
            .iter()
            .flat_map(|(event_type, entries)| {
                entries
                    .iter()
                    .filter(|p| p.name == name)
                    .map(|p| (event_type.clone(), p.run.clone()))
            })
            .collect()
    }

    /// The topic a message type is published to, if it leaves this service.
    pub fn topic(&self, message_type: &str) -> Option<&str> {
        self.topics.get(message_type).map(String::as_str)
    }

    /// The kind and payload check of a registered type; `None` for a type this service does not
    /// handle.
    pub fn known(&self, message_type: &str) -> Option<(MessageKind, DecodeCheck)> {
        self.kinds.get(message_type).copied()
    }
}

/// A shared, lock-briefly view of the current registry snapshot.
#[derive(Clone, Default)]
pub(crate) struct RegistryView(Arc<RwLock<Arc<RegistryTable>>>);

impl RegistryView {
    pub fn current(&self) -> Arc<RegistryTable> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, table: RegistryTable) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }
}

/// The registry actor.
pub struct Registry {
    table: RegistryTable,
    view: RegistryView,
    /// `coordinator.handler_timeout_ms`, given to every handler it registers.
    handler_timeout: Duration,
    /// This instance (for test-only fault injection).
    instance: uuid::Uuid,
    /// Where the handlers' run times are recorded.
    meters: Meters,
    /// Tells the supervisor when this actor ends (see `supervision`).
    _lifeline: Lifeline,
}

impl Registry {
    /// A registry whose table starts with the routing `topics` and no handlers.
    pub(crate) fn new(
        topics: BTreeMap<String, String>,
        view: RegistryView,
        handler_timeout: Duration,
        instance: uuid::Uuid,
        meters: Meters,
        lifeline: Lifeline,
    ) -> Registry {
        view.replace(RegistryTable {
            topics,
            ..RegistryTable::default()
        });
        Registry::resume(view, handler_timeout, instance, meters, lifeline)
    }

    /// A registry going on from the table `view` last published (a restart after a stop).
    pub(crate) fn resume(
        view: RegistryView,
        handler_timeout: Duration,
        instance: uuid::Uuid,
        meters: Meters,
        lifeline: Lifeline,
    ) -> Registry {
        Registry {
            table: (*view.current()).clone(),
            view,
            handler_timeout,
            instance,
            meters,
            _lifeline: lifeline,
        }
    }

    fn claim_kind(
        &mut self,
        message_type: &str,
        kind: MessageKind,
        check: DecodeCheck,
    ) -> Result<(), RegistryError> {
        match self.table.kinds.get(message_type) {
            Some((k, _)) if *k != kind => Err(RegistryError::KindClash(message_type.into())),
            _ => {
                self.table
                    .kinds
                    .insert(message_type.to_string(), (kind, check));
                Ok(())
            }
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

/// Registers the receptor of a command type.
pub struct RegisterReceptor {
    pub(crate) command_type: &'static str,
    pub(crate) check: DecodeCheck,
    pub(crate) receptor: Arc<dyn ErasedReceptor>,
}

impl RegisterReceptor {
    /// Registers `receptor` for command type `C`.
    pub fn new<C: Command, R: Receptor<C>>(receptor: R) -> RegisterReceptor {
        RegisterReceptor {
            command_type: C::TYPE_NAME,
            check: |b| {
                message::decode::<C>(b)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
            receptor: Arc::new(ReceptorAdapter::<C, R>::new(receptor)),
        }
    }
}

impl Message for RegisterReceptor {
    type Result = Result<(), RegistryError>;
}

impl Handler<RegisterReceptor> for Registry {
    type Result = Result<(), RegistryError>;

    fn handle(&mut self, msg: RegisterReceptor, _ctx: &mut Self::Context) -> Self::Result {
        fault::check(self.instance, ActorKind::Registry);
        if self.table.receptors.contains_key(msg.command_type) {
            return Err(RegistryError::DuplicateReceptor(msg.command_type.into()));
        }
        self.claim_kind(msg.command_type, MessageKind::Command, msg.check)?;
        let handle = ReceptorHandle::new(msg.receptor.clone(), self.handler_timeout);
        self.table.receptors.insert(
            msg.command_type.to_string(),
            ReceptorEntry {
                handle,
                meters: self.meters.receptor(msg.command_type),
                receptor: msg.receptor,
            },
        );
        self.view.replace(self.table.clone());
        Ok(())
    }
}

/// Registers a perspective of an event type under a name (unique per event type).
pub struct RegisterPerspective {
    pub(crate) event_type: &'static str,
    pub(crate) name: String,
    pub(crate) check: DecodeCheck,
    pub(crate) perspective: Registered,
}

/// What is registered: a plain perspective, or a read model and when it runs.
pub(crate) enum Registered {
    Plain(Arc<dyn ErasedPerspective>),
    Once(Arc<dyn ErasedReadModel>, Consistency),
}

impl RegisterPerspective {
    /// Registers `perspective` for event type `E` under `name`.
    pub fn new<E: Event, P: Perspective<E>>(name: impl Into<String>, perspective: P) -> Self {
        RegisterPerspective {
            event_type: E::TYPE_NAME,
            name: name.into(),
            check: |b| {
                message::decode::<E>(b)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
            perspective: Registered::Plain(Arc::new(PerspectiveAdapter::<E, P>::new(perspective))),
        }
    }

    /// Registers the read model `model` for event type `E` under `name`, run as `consistency`
    /// says.
    pub fn read_model<E: Event, R: ReadModel<E>>(
        name: impl Into<String>,
        model: R,
        consistency: Consistency,
    ) -> Self {
        RegisterPerspective {
            event_type: E::TYPE_NAME,
            name: name.into(),
            check: |b| {
                message::decode::<E>(b)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
            perspective: Registered::Once(
                Arc::new(ReadModelAdapter::<E, R>::new(model)),
                consistency,
            ),
        }
    }
}

impl Message for RegisterPerspective {
    type Result = Result<(), RegistryError>;
}

impl Handler<RegisterPerspective> for Registry {
    type Result = Result<(), RegistryError>;

    fn handle(&mut self, msg: RegisterPerspective, _ctx: &mut Self::Context) -> Self::Result {
        fault::check(self.instance, ActorKind::Registry);
        if self
            .table
            .perspectives(msg.event_type)
            .iter()
            .any(|p| p.name == msg.name)
        {
            return Err(RegistryError::DuplicatePerspective {
                name: msg.name,
                event_type: msg.event_type.into(),
            });
        }
        self.claim_kind(msg.event_type, MessageKind::Event, msg.check)?;
        let run = match msg.perspective {
            Registered::Plain(p) => {
                PerspectiveRun::Plain(PerspectiveHandle::new(p, self.handler_timeout))
            }
            Registered::Once(model, consistency) => PerspectiveRun::Once {
                handle: ReadModelHandle::new(model, self.handler_timeout),
                consistency,
            },
        };
        self.table
            .perspectives
            .entry(msg.event_type.to_string())
            .or_default()
            .push(PerspectiveEntry {
                meters: self.meters.perspective(&msg.name),
                name: msg.name,
                run,
            });
        self.view.replace(self.table.clone());
        Ok(())
    }
}
