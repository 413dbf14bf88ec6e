//! The registry: one receptor per command type, unique perspective names per event type, a type
//! name is either a command or an event; an unregistered command type is a typed error; a
//! command type with a topic but no local receptor is forwarded to the service that has one.

use crate::support::*;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use whizbang::registry::{RegisterPerspective, RegisterReceptor, RegistryError};
use whizbang::transport::memory::MemoryBus;
use whizbang::{
    Command, Decision, DispatchError, Event, Message, ReceiptStatus, Receptor, ReceptorContext,
    ReceptorError, Runtime, StartError,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Unknown {
    id: String,
}
impl Message for Unknown {
    const TYPE_NAME: &'static str = "registry.Unknown";
    fn stream_id(&self) -> String {
        self.id.clone()
    }
}
impl Command for Unknown {}

/// An event that claims the type name of the `Bump` command.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Impostor {
    stream: String,
}
impl Message for Impostor {
    const TYPE_NAME: &'static str = <Bump as Message>::TYPE_NAME;
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Impostor {}
impl Seq for Impostor {
    fn seq(&self) -> u32 {
        0
    }
}

async fn start() -> anyhow::Result<(Runtime, Recorder)> {
    let rec = Recorder::new();
    let rt = Runtime::builder(config("registry"))
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("rec", rec.clone())
        .start()
        .await?;
    Ok((rt, rec))
}

#[actix::test]
async fn a_second_receptor_for_a_command_type_is_refused() -> anyhow::Result<()> {
    let (rt, rec) = start().await?;
    let r = rt
        .registry()
        .send(RegisterReceptor::new::<Bump, _>(BumpReceptor))
        .await?;
    match r {
        Err(e @ RegistryError::DuplicateReceptor(_)) => {
            anyhow::ensure!(e.to_string().contains(Bump::TYPE_NAME), "{e}");
        }
        other => anyhow::bail!("expected DuplicateReceptor, got {other:?}"),
    }
    // The first one still serves.
    let stream = unique("dup");
    let r: Bumped = rt
        .local_invoke(Bump {
            stream: stream.clone(),
            seq: 1,
        })
        .await?;
    anyhow::ensure!(r.seq == 1 && rec.seqs(&stream) == vec![1]);

    // A second perspective under the same name for the same event type: refused; under
    // another name: fine, and it applies the next event.
    let r = rt
        .registry()
        .send(RegisterPerspective::new::<Bumped, _>(
            "rec",
            Recorder::new(),
        ))
        .await?;
    match r {
        Err(e @ RegistryError::DuplicatePerspective { .. }) => {
            anyhow::ensure!(e.to_string().contains("rec"), "{e}");
            anyhow::ensure!(e.to_string().contains(Bumped::TYPE_NAME), "{e}");
        }
        other => anyhow::bail!("expected DuplicatePerspective, got {other:?}"),
    }
    let late = Recorder::new();
    rt.registry()
        .send(RegisterPerspective::new::<Bumped, _>("late", late.clone()))
        .await??;
    let _: Bumped = rt
        .local_invoke(Bump {
            stream: stream.clone(),
            seq: 2,
        })
        .await?;
    anyhow::ensure!(late.seqs(&stream) == vec![2], "{:?}", late.seqs(&stream));
    anyhow::ensure!(rec.seqs(&stream) == vec![1, 2], "{:?}", rec.seqs(&stream));

    // One type name cannot be both a command and an event.
    let r = rt
        .registry()
        .send(RegisterPerspective::new::<Impostor, _>(
            "impostor",
            Recorder::new(),
        ))
        .await?;
    match r {
        Err(e @ RegistryError::KindClash(_)) => {
            anyhow::ensure!(e.to_string().contains(Bump::TYPE_NAME), "{e}");
        }
        other => anyhow::bail!("expected KindClash, got {other:?}"),
    }
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn duplicate_receptors_in_the_builder_fail_the_start() -> anyhow::Result<()> {
    let r = Runtime::builder(config("twice"))
        .receptor::<Bump, _>(BumpReceptor)
        .receptor::<Bump, _>(BumpReceptor)
        .start()
        .await;
    match r {
        Err(e @ StartError::Registry(RegistryError::DuplicateReceptor(_))) => {
            anyhow::ensure!(e.to_string().contains(Bump::TYPE_NAME), "{e}");
        }
        Err(other) => anyhow::bail!("expected a duplicate receptor error, got {other}"),
        Ok(_) => anyhow::bail!("started with two receptors for one command type"),
    }
    Ok(())
}

#[actix::test]
async fn an_unregistered_command_type_is_handler_not_found() -> anyhow::Result<()> {
    let (rt, _) = start().await?;
    let check = |e: Option<DispatchError>, via: &str| -> anyhow::Result<()> {
        match e {
            Some(e @ DispatchError::HandlerNotFound { .. }) => {
                anyhow::ensure!(e.to_string().contains(Unknown::TYPE_NAME), "{via}: {e}");
                if let DispatchError::HandlerNotFound { message_type } = &e {
                    anyhow::ensure!(message_type == Unknown::TYPE_NAME, "{via}: {message_type}");
                }
                Ok(())
            }
            other => anyhow::bail!("{via}: expected HandlerNotFound, got {other:?}"),
        }
    };
    let id = unique("nobody");
    check(
        rt.local_invoke::<Unknown, ()>(Unknown { id: id.clone() })
            .await
            .err(),
        "local_invoke",
    )?;
    check(rt.send(Unknown { id: id.clone() }).await.err(), "send")?;
    anyhow::ensure!(rt.store().read_stream(&id, 1).await?.is_empty());
    anyhow::ensure!(rt.store().read_all(0, 100).await?.is_empty());
    // Receptors registered after start are found.
    rt.registry()
        .send(RegisterReceptor::new::<Unknown, _>(UnknownReceptor))
        .await??;
    let r: String = rt.local_invoke(Unknown { id: id.clone() }).await?;
    anyhow::ensure!(r == id);
    rt.shutdown().await?;
    Ok(())
}

struct UnknownReceptor;

impl Receptor<Unknown> for UnknownReceptor {
    type Result = String;

    async fn handle(
        &self,
        cmd: Unknown,
        _ctx: ReceptorContext,
    ) -> Result<Decision<String>, ReceptorError> {
        Ok(Decision::new(cmd.id))
    }
}

// ---- A command handled by another service ----------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ship {
    order: String,
    seq: u32,
}
impl Message for Ship {
    const TYPE_NAME: &'static str = "registry.Ship";
    fn stream_id(&self) -> String {
        format!("shipment-{}", self.order)
    }
}
impl Command for Ship {}

#[derive(Clone, Default)]
struct ShipReceptor(Arc<Mutex<Vec<(u32, ReceptorContext)>>>);

impl Receptor<Ship> for ShipReceptor {
    type Result = ();

    async fn handle(&self, cmd: Ship, ctx: ReceptorContext) -> Result<Decision<()>, ReceptorError> {
        self.0.lock().unwrap().push((cmd.seq, ctx.clone()));
        Ok(Decision::new(()).emit(&Bumped::new(ctx.stream_id, cmd.seq)))
    }
}

#[actix::test]
async fn a_command_with_a_topic_but_no_receptor_goes_to_the_service_that_has_one()
-> anyhow::Result<()> {
    let bus = MemoryBus::new();
    let receptor = ShipReceptor::default();
    let shipped = Recorder::new();
    let shipping = on_bus(subscribed(config("shipping"), "shipping", "shipping"), &bus)
        .receptor::<Ship, _>(receptor.clone())
        .perspective::<Bumped, _>("shipped", shipped.clone())
        .start()
        .await?;
    let orders = on_bus(
        publishing(config("orders"), Ship::TYPE_NAME, "shipping"),
        &bus,
    )
    .start()
    .await?;

    let order = unique("o");
    let mut receipts = Vec::new();
    for seq in 1..=3 {
        let receipt = orders
            .send(Ship {
                order: order.clone(),
                seq,
            })
            .await?;
        anyhow::ensure!(receipt.status == ReceiptStatus::Accepted, "{receipt:?}");
        anyhow::ensure!(receipt.events.is_empty(), "{receipt:?}");
        receipts.push(receipt);
    }
    // local_invoke needs a local receptor: it wants the typed result.
    let e = orders
        .local_invoke::<Ship, ()>(Ship {
            order: order.clone(),
            seq: 99,
        })
        .await
        .err();
    anyhow::ensure!(
        matches!(e, Some(DispatchError::HandlerNotFound { .. })),
        "{e:?}"
    );

    let stream = format!("shipment-{order}");
    wait_until("the shipping service to handle the commands", || {
        shipped.seqs(&stream).len() >= 3
    })
    .await?;
    anyhow::ensure!(
        shipped.seqs(&stream) == vec![1, 2, 3],
        "{:?}",
        shipped.seqs(&stream)
    );
    let handled = receptor.0.lock().unwrap().clone();
    anyhow::ensure!(handled.len() == 3, "{} commands handled", handled.len());
    for ((seq, ctx), receipt) in handled.iter().zip(&receipts) {
        anyhow::ensure!(ctx.message_id == receipt.message_id, "seq {seq}: {ctx:?}");
        anyhow::ensure!(
            ctx.correlation_id == receipt.correlation_id,
            "seq {seq}: {ctx:?}"
        );
    }
    // The events are the shipping service's, caused by the forwarded commands.
    let stored = shipping.store().read_stream(&stream, 1).await?;
    anyhow::ensure!(stored.len() == 3);
    for (event, receipt) in stored.iter().zip(&receipts) {
        anyhow::ensure!(event.envelope.causation_id == Some(receipt.message_id));
    }
    anyhow::ensure!(orders.store().read_all(0, 100).await?.is_empty());
    orders.shutdown().await?;
    shipping.shutdown().await?;
    Ok(())
}
