//! Fast CPU kernels as candle custom ops with their own backward passes: 2-D convolution
//! (brisk's packed AVX-512 or AVX2 kernels, or im2col/col2im + GEMM; forward, input
//! gradient and weight gradient), padded max-pooling, fused batch-norm (+ReLU) and the
//! fused SGD update. Every op is checked against candle's reference op.
//!
//! Each op's arithmetic is also public on plain f32 slices (`conv_forward`,
//! `conv_input_grad`, `conv_weight_grad`, `bn_stats`, `bn_normalize`, `bn_grad_sums`,
//! `bn_input_grad`, `relu_backward`, `MaxPool::forward`/`backward`): the custom ops wrap
//! them, and brisk-models' engine runs a whole training step on them without candle's
//! autograd.

mod batchnorm;
mod conv;
mod elementwise;
mod fill;
mod gemm;
mod half;
mod optim;
mod packed;
mod pool;
mod shape;
mod storage;

pub use batchnorm::{
    batch_norm, bn_grad_sums, bn_input_grad, bn_input_grad_in_place, bn_normalize, bn_stats,
    combine_batch_stats, combine_grad_sums, BatchNormOutput, BatchNormSync, BnParams, Epilogue,
};
pub use conv::{conv2d, conv_forward, conv_input_grad, conv_weight_grad, ConvShape, Products};
pub use elementwise::{add_assign, relu_backward};
pub use fill::par_build;
pub use gemm::{matmul_f32, Mat};
pub use half::{round_to_bf16, round_to_f16};
pub use optim::{sgd_update, SgdStep};
pub use packed::isa::{half_products, isa_supported, ISA_CHOICES};
pub use pool::{max_pool2d, MaxPool};

/// Prepares the process for brisk's kernels: `threads` compute threads for brisk's
/// kernels and candle's own CPU ops (both run on rayon's global pool; candle also reads
/// `RAYON_NUM_THREADS`), and an allocator that keeps freed memory (see
/// [`keep_freed_memory`]). Call once, early, before any tensor work; a second call with
/// another thread count is an error.
pub fn init_compute(threads: usize) -> candle_core::Result<()> {
    if threads == 0 {
        candle_core::bail!("thread count must be at least 1");
    }
    keep_freed_memory();
    // candle reads the variable whenever it sizes its work; setting it before any
    // compute thread exists keeps every reader consistent.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == threads => Ok(()),
        Err(e) => candle_core::bail!(
            "cannot use {threads} threads: the thread pool already runs {} ({e})",
            rayon::current_num_threads()
        ),
    }
}

/// The compute threads a process gets when none are asked for, at least one. The one
/// place this default is decided. A process bound to fewer cores than the host has (a
/// launcher's binding, `taskset`) takes the cores it is bound to: that is its share.
/// Otherwise the host's cores are shared by the `ranks_on_host` processes on it (so
/// `mpirun -np 2 --bind-to none` on two cores does not oversubscribe).
pub fn default_threads(ranks_on_host: usize) -> usize {
    let (usable, online) = cores();
    threads_for(usable, online, ranks_on_host)
}

fn threads_for(usable: usize, online: usize, ranks_on_host: usize) -> usize {
    if usable < online {
        usable.max(1)
    } else {
        (online / ranks_on_host.max(1)).max(1)
    }
}

/// (cores this process may run on, cores online on the host).
pub fn cores() -> (usize, usize) {
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf has no preconditions; it returns -1 when the value is unknown.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    (usable, usize::try_from(online).map_or(usable, |n| n.max(usable)))
}

/// When `ranks_on_host` processes bound like this one leave most of the host idle (OpenMPI
/// binds each of up to two ranks to one core by default), a sentence saying so and what to
/// pass instead; `None` when the ranks' bindings cover the host.
pub fn binding_warning(ranks_on_host: usize) -> Option<String> {
    let (usable, online) = cores();
    binding_warning_for(usable, online, ranks_on_host)
}

fn binding_warning_for(usable: usize, online: usize, ranks_on_host: usize) -> Option<String> {
    (usable * ranks_on_host.max(1) < online).then(|| {
        format!(
            "this rank may run on {usable} of the host's {online} cores (the launcher bound it); \
             with {ranks_on_host} rank(s) on this host, {} cores stay idle: pass `--bind-to none` to \
             mpirun (each rank then takes {} threads) or `--map-by slot:PE=N`",
            online - usable * ranks_on_host.max(1),
            (online / ranks_on_host.max(1)).max(1)
        )
    })
}

/// Compute threads in use (the global pool's size).
pub fn compute_threads() -> usize {
    rayon::current_num_threads()
}

/// Makes glibc's malloc serve large blocks from its heap and keep freed memory mapped.
///
/// A training step allocates and frees the same large activation and gradient buffers
/// every step. By default glibc maps each block over 128 KiB with mmap and unmaps it on
/// free: every step then pays page faults to touch fresh pages, and each munmap stops the
/// other cores for a TLB shootdown. Measured here (2 threads, CIFAR ResNet-18, batch 32)
/// that was a third of the convolution input-gradient time. So no block is mmapped (raising
/// the mmap threshold is not enough: glibc caps it at 32 MiB, and at batch 128 every
/// 64-channel 32x32 activation is 33.5 MB; a stride-2 input gradient, which accumulates
/// into its zeroed buffer, then faulted every page twice, zero page then copy on write,
/// and the input-gradient convolutions of a batch-128 step took 1,140 ms instead of 845)
/// and trimming is off: memory is reused from step to step, as PyTorch's caching
/// allocator does. One arena for every thread: glibc gives other threads arenas of their
/// own and unmaps such an arena's heap whole once it empties, whatever the trim
/// threshold; buffers that the compute threads allocated then came back as fresh pages
/// each step (measured: ~7,700 page faults a step, 350 with one arena). Elsewhere than
/// Linux/glibc this does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called with valid
    // parameter numbers and values, and glibc rejects (returns 0 for) values it cannot take.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The heap's size and the bytes allocated in it now, from glibc's `mallinfo2` (`None`
/// elsewhere). With [`keep_freed_memory`]'s settings the heap never shrinks, so its size is
/// the high-water mark of everything allocated so far.
pub fn heap_bytes() -> Option<(usize, usize)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters and returns them by value.
        let info = unsafe { libc::mallinfo2() };
        Some((info.arena, info.uordblks))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

#[cfg(test)]
mod tests {
    use super::{binding_warning_for, threads_for};

    #[test]
    fn the_cores_are_shared_by_the_ranks_on_a_host() {
        // Unbound (16 of 16 cores usable): the host's cores divided by its ranks.
        assert_eq!(threads_for(16, 16, 1), 16);
        assert_eq!(threads_for(16, 16, 0), 16, "no ranks counts as one");
        assert_eq!(threads_for(16, 16, 4), 4);
        assert_eq!(threads_for(2, 2, 8), 1, "never fewer than one thread");
        // Bound by a launcher to 4 of 16 cores: those 4 are this rank's share.
        assert_eq!(threads_for(4, 16, 4), 4);
        assert_eq!(threads_for(1, 16, 2), 1);
        // This process: whatever its binding, at least one thread, at most its cores.
        let (usable, online) = super::cores();
        assert!(usable >= 1 && online >= usable);
        assert!((1..=usable).contains(&super::default_threads(1)));
    }

    #[test]
    fn a_binding_that_leaves_cores_idle_is_explained() {
        // OpenMPI's default for two ranks: each bound to one core of 16.
        let w = binding_warning_for(1, 16, 2).unwrap_or_default();
        assert!(
            w.contains("1 of the host's 16 cores") && w.contains("14 cores stay idle"),
            "{w}"
        );
        assert!(
            w.contains("--bind-to none") && w.contains("takes 8 threads"),
            "{w}"
        );
        // Bindings that cover the host, or no binding: nothing to say.
        assert_eq!(binding_warning_for(8, 16, 2), None);
        assert_eq!(binding_warning_for(16, 16, 2), None);
        assert_eq!(binding_warning_for(1, 2, 2), None);
    }
}
