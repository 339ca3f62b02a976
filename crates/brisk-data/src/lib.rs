//! Shard format, dataset importers, sampler, augmentations and the prefetching `Loader` (filled by the data issue).
