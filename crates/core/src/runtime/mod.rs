//! The runtime floor: a built runtime's directory, dispatch, alarm timer and drain.
//!
//! - [`facade`]: [`Runtime`], the front door of a built runtime, and its graceful drain.
//! - [`dispatch`]: how a request reaches an actor; the handle an ingress is given.
//! - [`directory`]: which actor a type name and key resolve to.
//! - [`activation`]: the `Activation` seam (who starts and stops actor tasks) and
//!   today's on-demand implementation.
//! - [`ingress`]: the `Ingress` seam, the front door that turns requests into dispatches.
//! - [`alarms`]: the timer task that fires due schedules.
//! - [`target`]: which actor a request names ([`Target`], [`Resolve`]).
//!
//! Rule: this floor uses the actor floor, the storage floor (through the `Storage` seam) and
//! the base modules; it never names the server, which sits above it behind `Ingress`.

pub(crate) mod activation;
pub(crate) mod alarms;
pub(crate) mod directory;
pub(crate) mod dispatch;
pub(crate) mod facade;
pub(crate) mod ingress;
pub(crate) mod target;

pub use facade::Runtime;
pub use target::{Resolve, Target};
