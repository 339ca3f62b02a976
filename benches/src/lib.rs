//! Holds no code: the criterion benchmarks live in `benches/benches/`, one file per subject.
