//! Types that cross cpt's process boundaries (server ↔ worker ↔ user): model shapes, job specs and
//! their validation, resolved plans, and training events. Pure data and arithmetic, no I/O.

pub mod adapter;
pub mod budget;
pub mod events;
pub mod jobs;
pub mod model_config;
pub mod plan;
pub mod prepare;
pub mod sampling;
pub mod spec;
pub mod sweep;
pub mod vocabulary;
pub mod worker;

pub use events::{Event, StepMetrics, WarningCode};
pub use jobs::{JobKind, JobState};
pub use model_config::ModelConfig;
pub use plan::Plan;
pub use spec::JobSpec;
