//! Job events: ingested from workers in batches (stored once per job, attempt and sequence number),
//! listed with a cursor, streamed over SSE, and the views derived from them (metric series,
//! charts, checkpoints).

pub mod charts;
pub mod routes;
pub mod series;
pub mod store;
mod stream;

pub use store::StoredEvent;
