//! One module per `brisk` subcommand: its clap `Args` and its `run`.

pub mod bench;
pub mod compress;
pub mod data;
pub mod models;
pub mod train;
