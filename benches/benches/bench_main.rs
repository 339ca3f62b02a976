//! The one criterion entry point: each subject lives in its own file beside this one.

mod models;

criterion::criterion_main!(models::benches);
