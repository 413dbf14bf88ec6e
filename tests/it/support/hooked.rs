//! A memory store whose work batches and heartbeats go through a test's hook (delay them, fail
//! them, lose their answers): a stand-in for a database whose replies are slow or lost. Every
//! other call goes straight to the memory store; the hook must not touch anything but the batch
//! or heartbeat it is given.

use uuid::Uuid;
use whizbang::Config;

/// Decides how a [`HookedStore`] runs each work batch (delay it, lose its answer, …); every
/// other call goes straight to the memory store.
#[async_trait::async_trait]
pub trait BatchHook: Send + Sync + 'static {
    /// Runs a work batch (straight through unless a test wants it changed).
    async fn process(
        &self,
        inner: &whizbang::store::memory::MemoryStore,
        instance: Uuid,
        batch: whizbang::store::WorkBatch,
    ) -> Result<whizbang::store::WorkBatchResult, whizbang::store::StoreError> {
        whizbang::store::Store::process_work_batch(inner, instance, batch).await
    }

    /// Runs a heartbeat (straight through unless a test wants it slow).
    async fn heartbeat(
        &self,
        inner: &whizbang::store::memory::MemoryStore,
        instance: Uuid,
    ) -> Result<whizbang::store::Heartbeat, whizbang::store::StoreError> {
        whizbang::store::Store::heartbeat(inner, instance).await
    }
}

/// A memory store whose work batches go through `hook`: a stand-in for a database whose
/// replies are slow or lost.
pub struct HookedStore<H> {
    pub inner: whizbang::store::memory::MemoryStore,
    pub hook: H,
}

impl<H: BatchHook> HookedStore<H> {
    pub fn new(config: &Config, hook: H) -> HookedStore<H> {
        HookedStore {
            inner: whizbang::store::memory::MemoryStore::new(
                whizbang::store::StoreSettings::from_config(config),
            ),
            hook,
        }
    }
}

#[async_trait::async_trait]
impl<H: BatchHook> whizbang::store::Store for HookedStore<H> {
    async fn register_instance(
        &self,
        instance: Uuid,
        service: &str,
        host: &str,
    ) -> Result<(), whizbang::store::StoreError> {
        self.inner.register_instance(instance, service, host).await
    }
    async fn heartbeat(
        &self,
        instance: Uuid,
    ) -> Result<whizbang::store::Heartbeat, whizbang::store::StoreError> {
        self.hook.heartbeat(&self.inner, instance).await
    }
    async fn process_work_batch(
        &self,
        instance: Uuid,
        batch: whizbang::store::WorkBatch,
    ) -> Result<whizbang::store::WorkBatchResult, whizbang::store::StoreError> {
        self.hook.process(&self.inner, instance, batch).await
    }
    async fn apply_once(
        &self,
        read_model: &str,
        message_id: Uuid,
        replay: bool,
        apply: &dyn whizbang::store::ApplyInTx,
    ) -> Result<whizbang::store::AppliedOnce, whizbang::store::StoreError> {
        self.inner
            .apply_once(read_model, message_id, replay, apply)
            .await
    }
    async fn apply_once_many(
        &self,
        instance: Uuid,
        work: &[whizbang::store::OnceWork<'_>],
    ) -> Result<whizbang::store::AppliedMany, whizbang::store::StoreError> {
        self.inner.apply_once_many(instance, work).await
    }
    async fn commit_inline(
        &self,
        instance: Uuid,
        unit: whizbang::store::UnitOfWork,
        apply: &dyn whizbang::store::InlineApply,
    ) -> Result<whizbang::store::InlineOutcome, whizbang::store::StoreError> {
        self.inner.commit_inline(instance, unit, apply).await
    }
    async fn release_partitions(
        &self,
        instance: Uuid,
        partitions: Option<&[u32]>,
    ) -> Result<(), whizbang::store::StoreError> {
        self.inner.release_partitions(instance, partitions).await
    }
    async fn read_stream(
        &self,
        stream_id: &str,
        from: u64,
    ) -> Result<Vec<whizbang::store::StoredEvent>, whizbang::store::StoreError> {
        self.inner.read_stream(stream_id, from).await
    }
    async fn read_all(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<whizbang::store::StoredEvent>, whizbang::store::StoreError> {
        self.inner.read_all(after, limit).await
    }
    async fn last_position(&self) -> Result<u64, whizbang::store::StoreError> {
        self.inner.last_position().await
    }
    async fn inbox_settled(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, whizbang::store::InboxSettled)>, whizbang::store::StoreError> {
        self.inner.inbox_settled(ids).await
    }
    async fn correlation_status(
        &self,
        id: Uuid,
    ) -> Result<whizbang::store::CorrelationStatus, whizbang::store::StoreError> {
        self.inner.correlation_status(id).await
    }
    async fn dead_letters(
        &self,
    ) -> Result<Vec<whizbang::store::DeadLetter>, whizbang::store::StoreError> {
        self.inner.dead_letters().await
    }
    async fn requeue_dead_letter(&self, id: Uuid) -> Result<(), whizbang::store::StoreError> {
        self.inner.requeue_dead_letter(id).await
    }
    async fn skip_dead_letter(&self, id: Uuid) -> Result<(), whizbang::store::StoreError> {
        self.inner.skip_dead_letter(id).await
    }
    async fn load_checkpoint(
        &self,
        perspective: &str,
    ) -> Result<Option<u64>, whizbang::store::StoreError> {
        self.inner.load_checkpoint(perspective).await
    }
    async fn save_checkpoint(
        &self,
        perspective: &str,
        position: u64,
    ) -> Result<(), whizbang::store::StoreError> {
        self.inner.save_checkpoint(perspective, position).await
    }
    async fn idempotency_record(
        &self,
        key: &str,
    ) -> Result<Option<whizbang::store::IdempotencyRecord>, whizbang::store::StoreError> {
        self.inner.idempotency_record(key).await
    }
    fn work_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.work_signal()
    }
}
