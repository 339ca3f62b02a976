//! `Sampler`: the order of an epoch, from (seed, epoch) alone, split between ranks.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Which indices of a split one rank reads in an epoch.
///
/// The epoch's order is a permutation of `0..len` drawn from (seed, epoch) (or `0..len`
/// itself without shuffling). As PyTorch's `DistributedSampler` does, the order is padded
/// by repeating its first indices until its length is a multiple of `world`, and rank r
/// takes positions r, r + world, r + 2·world, …: the parts are disjoint in position, equal
/// in size (`ceil(len / world)`), and together cover every index (a few twice when
/// `len` is not a multiple of `world`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sampler {
    len: usize,
    seed: u64,
    rank: usize,
    world: usize,
    shuffle: bool,
}

impl Sampler {
    pub fn new(len: usize, seed: u64, rank: usize, world: usize, shuffle: bool) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::InvalidConfig {
                field: "rank",
                problem: format!("rank {rank} is not below world size {world}"),
            });
        }
        Ok(Sampler {
            len,
            seed,
            rank,
            world,
            shuffle,
        })
    }

    /// Indices this rank reads per epoch.
    pub fn per_rank(&self) -> usize {
        self.len.div_ceil(self.world)
    }

    /// This rank's indices for `epoch`, in reading order.
    pub fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch);
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
        }
        let total = self.per_rank() * self.world;
        (self.rank..total)
            .step_by(self.world)
            .map(|p| order[p % self.len.max(1)])
            .filter(|_| self.len > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_depends_only_on_seed_and_epoch() {
        let s = Sampler::new(100, 5, 0, 1, true).expect("sampler");
        assert_eq!(s.epoch_indices(3), s.clone().epoch_indices(3));
        assert_ne!(s.epoch_indices(3), s.epoch_indices(4));
        assert_ne!(
            s.epoch_indices(3),
            Sampler::new(100, 6, 0, 1, true)
                .expect("sampler")
                .epoch_indices(3)
        );
        let mut sorted = s.epoch_indices(3);
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn ranks_are_equal_disjoint_and_cover_the_epoch() {
        for (len, world) in [(100, 4), (103, 4), (5, 3), (7, 1)] {
            let parts: Vec<Vec<usize>> = (0..world)
                .map(|r| {
                    Sampler::new(len, 9, r, world, true)
                        .expect("sampler")
                        .epoch_indices(2)
                })
                .collect();
            let per = len.div_ceil(world);
            assert!(parts.iter().all(|p| p.len() == per), "{len}/{world}");
            let mut all: Vec<usize> = parts.concat();
            all.sort();
            all.dedup();
            assert_eq!(all, (0..len).collect::<Vec<_>>(), "{len}/{world}");
            // Without padding (len divisible by world) no index appears twice.
            if len % world == 0 {
                assert_eq!(parts.concat().len(), len);
            }
        }
    }

    #[test]
    fn bad_rank_is_an_error() {
        assert!(Sampler::new(10, 0, 2, 2, true).is_err());
        assert!(Sampler::new(10, 0, 0, 0, true).is_err());
    }
}
