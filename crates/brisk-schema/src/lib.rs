//! What brisk's runs read and write, with no tensor library, so that tools reading runs
//! (the experiment runner, a user's script) build in seconds: the training config with
//! its schedules and validation (`TrainConfig`), the event log's `Event`s
//! (`metrics.jsonl`), the run's `TrainSummary` (`summary.json`), the compression
//! commands' `CompressReport`, and the names of the files in a run folder.
//!
//! The crates that write these (brisk-train, brisk-compress, brisk-cli) and the ones that
//! read them (xtask) share these types, so a field renamed on one side is a compile
//! error on the other.

pub mod config;
pub mod error;
pub mod events;
pub mod figures;
pub mod layout;
pub mod schedule;
pub mod summary;

pub use config::{
    AdamWConfig, CheckpointSettings, DeviceChoice, DistributedSettings, EmaSettings, EvalSettings,
    LoaderSettings, LrConfig, ModelChoice, OptimizerConfig, OptimizerKind, SgdConfig, TrainConfig,
};
pub use error::{Error, Result};
pub use events::{Event, EventRecord, StepRecord};
pub use figures::{CompressReport, Figures};
pub use schedule::{BatchSchedule, LrScaling, LrSchedule, LrShape};
pub use summary::TrainSummary;
