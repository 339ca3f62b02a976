//! Test support: an in-process stand-in for MPI (`world` threads exchanging buffers
//! through shared slots and a barrier) and `run_ranks`, which runs a closure as each rank.

use std::sync::{Arc, Barrier, Mutex};

use crate::comm::Communicator;

/// An in-process stand-in for MPI, for tests: `world` threads exchange buffers
/// through shared slots and a barrier.
#[derive(Debug)]
struct Threads {
    rank: usize,
    world: usize,
    barrier: Arc<Barrier>,
    slots: Arc<Mutex<Vec<Vec<f64>>>>,
}

impl Threads {
    fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
        self.slots.lock().expect("slots")[self.rank] = mine;
        self.barrier.wait();
        let all = self.slots.lock().expect("slots").clone();
        self.barrier.wait();
        all
    }
}

impl Communicator for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn local_ranks(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> crate::Result<()> {
        let all = self.exchange(buf.iter().map(|&v| f64::from(v)).collect());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = all.iter().map(|r| r[i] as f32).sum();
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> crate::Result<()> {
        let all = self.exchange(buf.to_vec());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = all.iter().map(|r| r[i]).sum();
        }
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> crate::Result<()> {
        let all = self.exchange(buf.iter().map(|&v| f64::from(v)).collect());
        for (b, v) in buf.iter_mut().zip(&all[root]) {
            *b = *v as f32;
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> crate::Result<()> {
        let all = self.exchange(buf.iter().map(|&v| f64::from(v)).collect());
        for (b, v) in buf.iter_mut().zip(&all[root]) {
            *b = *v as u8;
        }
        Ok(())
    }
    fn barrier(&self) -> crate::Result<()> {
        self.barrier.wait();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        panic!("rank {} aborted the job with {code}", self.rank)
    }
}

/// Runs `f` as every rank of a `world`-thread job and returns each rank's result, rank 0
/// first.
pub(crate) fn run_ranks<T, F>(world: usize, f: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(Arc<dyn Communicator>) -> anyhow::Result<T> + Send + Sync + 'static,
{
    let barrier = Arc::new(Barrier::new(world));
    let slots = Arc::new(Mutex::new(vec![Vec::new(); world]));
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let comm: Arc<dyn Communicator> = Arc::new(Threads {
                rank,
                world,
                barrier: barrier.clone(),
                slots: slots.clone(),
            });
            let f = f.clone();
            std::thread::spawn(move || f(comm))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank thread panicked"))?)
        .collect()
}
