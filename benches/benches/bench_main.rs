//! The one criterion entry point: each subject lives in its own file beside this one.

mod batchnorm;
mod conv;
mod files;
mod loader;
mod models;

criterion::criterion_main!(
    batchnorm::benches,
    conv::benches,
    files::benches,
    loader::benches,
    models::benches
);
