//! Where a runtime is put together: the one place that picks the implementation behind each
//! seam. Embedded, that is the embedded storage (SQLite and the group-commit writer),
//! on-demand activation (inside the dispatch) and keel's HTTP and WebSocket server as the
//! ingress. Driven (engine mode), the storage and the driver's intents come from outside the
//! crate, actors start only when the driver says so, and requests arrive tunneled for an
//! actor the driver has already resolved.
//!
//! It sits on the top floor with the registry, since it names every floor below; nothing but
//! the registry and the crate's front door uses it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::actor_type::ActorTypes;
use crate::config::RuntimeConfig;
use crate::error::Result;
use crate::host::Host;
use crate::metrics::{Gauges, Metrics, WriterStats};
use crate::runtime::activation::Intents;
use crate::runtime::dispatch::Dispatch;
use crate::runtime::facade::Runtime;
use crate::server::HttpIngress;
use crate::storage::embedded::EmbeddedStorage;
use crate::storage::seam::Storage;

impl Runtime {
    /// Opens storage and starts the writer. `root` is the registry's root token; the runtime's
    /// drain token is its child, so tripping the root begins the drain's first phase at once.
    pub fn open(
        config: RuntimeConfig,
        types: Arc<ActorTypes>,
        host: Arc<dyn Host>,
        root: &CancellationToken,
    ) -> Result<Runtime> {
        Runtime::open_with(config, types, host, root, Arc::default())
    }

    /// [`Runtime::open`], counting into `metrics` (a registry's, which outlive its runtime).
    /// Blocking I/O (it opens the database): call it off the async workers, or at start-up.
    pub fn open_with(
        config: RuntimeConfig,
        types: Arc<ActorTypes>,
        host: Arc<dyn Host>,
        root: &CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Result<Runtime> {
        config.validate()?;
        let (storage, pending) = EmbeddedStorage::open(&config)?;
        let writer_stats = storage.stats().clone();
        let storage: Arc<dyn Storage> = Arc::new(storage);
        let dispatch = Arc::new(Dispatch::new(
            config,
            types,
            host,
            storage,
            root.child_token(),
            metrics.clone(),
            None,
        ));
        let gauges: Arc<dyn Gauges> = dispatch.clone();
        metrics.attach(Arc::downgrade(&gauges), writer_stats.clone());
        for (id, actor_id, at_ms) in pending {
            dispatch.schedules.add(id, Arc::from(actor_id), at_ms);
        }
        let ingress = Arc::new(HttpIngress::new(dispatch.clone()));
        Ok(Runtime::new(dispatch, ingress, writer_stats))
    }

    /// A driven runtime (engine mode) over `storage`: actors run only between the driver's
    /// [`Runtime::start_actor`] and [`Runtime::stop_actor`], and an actor that sleeps or
    /// destroys itself tells `intents`. Nothing is listened on; requests come through
    /// [`Runtime::handle_tunneled`].
    pub fn open_driven(
        config: RuntimeConfig,
        types: Arc<ActorTypes>,
        host: Arc<dyn Host>,
        root: &CancellationToken,
        metrics: Arc<Metrics>,
        storage: Arc<dyn Storage>,
        intents: Arc<dyn Intents>,
    ) -> Result<Runtime> {
        config.validate()?;
        let writer_stats = Arc::new(WriterStats::default());
        let dispatch = Arc::new(Dispatch::new(
            config,
            types,
            host,
            storage,
            root.child_token(),
            metrics.clone(),
            Some(intents),
        ));
        let gauges: Arc<dyn Gauges> = dispatch.clone();
        metrics.attach(Arc::downgrade(&gauges), writer_stats.clone());
        let ingress = Arc::new(HttpIngress::new(dispatch.clone()));
        Ok(Runtime::new(dispatch, ingress, writer_stats))
    }
}
