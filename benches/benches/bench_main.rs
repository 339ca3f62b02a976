//! The one criterion entry point: each subject lives in its own file beside this one.

mod conv;
mod models;

criterion::criterion_main!(conv::benches, models::benches);
