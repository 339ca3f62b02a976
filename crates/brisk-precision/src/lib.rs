//! Precision policy, f32 master weights and dynamic loss scaling (filled by the mixed-precision issue).
