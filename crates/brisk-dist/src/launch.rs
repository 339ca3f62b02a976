//! Starting a distributed run: is this process one of `mpirun`'s ranks, which
//! communicator to use, how many compute threads each rank takes, and whether every rank
//! was given the same configuration.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::comm::{broadcast_vec, Communicator, Local};
use crate::error::{Error, Result};

/// Environment variables through which MPI launchers tell a process it is a rank:
/// OpenMPI's `mpirun`, then PMI/PMIx (MPICH's Hydra, Slurm's `srun`).
const LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"];

/// The launcher variable that says this process was started by an MPI launcher, if any.
pub fn launcher_variable() -> Option<&'static str> {
    LAUNCHER_VARS.into_iter().find(|v| std::env::var_os(v).is_some())
}

/// Whether this build has the MPI backend (cargo feature `mpi`).
pub const MPI_BUILT: bool = cfg!(feature = "mpi");

/// The communicator for this process: MPI when `distributed` is asked for or an MPI
/// launcher started it, else `Local`. Asking for MPI in a build without it is an error
/// that says how to get it.
pub fn connect(distributed: bool) -> Result<Arc<dyn Communicator>> {
    let wanted = distributed || launcher_variable().is_some();
    if !wanted {
        return Ok(Arc::new(Local));
    }
    mpi_world()
}

#[cfg(feature = "mpi")]
fn mpi_world() -> Result<Arc<dyn Communicator>> {
    Ok(Arc::new(crate::mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world() -> Result<Arc<dyn Communicator>> {
    let why = match launcher_variable() {
        Some(v) => format!("this process was started by an MPI launcher ({v} is set)"),
        None => "--distributed was given".to_string(),
    };
    Err(Error::Mpi {
        problem: format!(
            "{why}, but this brisk was built without MPI. Install OpenMPI and libclang \
             (Debian/Ubuntu: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`) and build with \
             `cargo build --release -p brisk-cli --features mpi`"
        ),
    })
}

/// NCCL over one GPU per rank, bootstrapped through MPI (feature `nccl`).
#[cfg(feature = "nccl")]
pub fn connect_nccl() -> Result<Arc<dyn Communicator>> {
    let mpi = crate::mpi::Mpi::init()?;
    Ok(Arc::new(crate::nccl::Nccl::init(mpi)?))
}

/// NCCL over one GPU per rank, bootstrapped through MPI (feature `nccl`).
#[cfg(not(feature = "nccl"))]
pub fn connect_nccl() -> Result<Arc<dyn Communicator>> {
    Err(Error::Mpi {
        problem: "this brisk was built without NCCL: build with `--features nccl` (CUDA, libnccl and MPI; \
                  docs/distributed.md)"
            .into(),
    })
}

/// Checks that every rank holds the same configuration (TOML text; the keys in `ignore`,
/// dotted, may differ). On a mismatch every rank returns the same error, naming the first
/// rank that differs, the first field it differs in and both values: whichever rank's message
/// the launcher prints first says what is wrong.
pub fn check_same_config(comm: &dyn Communicator, toml_text: &str, ignore: &[&str]) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let mut root = toml_text.as_bytes().to_vec();
    broadcast_vec(comm, &mut root, 0)?;
    let parse = |text: &str| -> Result<BTreeMap<String, String>> {
        let value: toml::Value = text.parse().map_err(|e: toml::de::Error| Error::Mpi {
            problem: format!("cannot read a rank's configuration: {e}"),
        })?;
        let mut flat = BTreeMap::new();
        flatten("", &value, &mut flat);
        for key in ignore {
            flat.remove(*key);
        }
        Ok(flat)
    };
    let ours = parse(&String::from_utf8_lossy(&root))?;
    let mine = parse(toml_text)?;
    let missing = || "(not set)".to_string();
    // field, rank 0's value, this rank's value
    let difference: Option<[String; 3]> = ours
        .keys()
        .chain(mine.keys())
        .find(|k| ours.get(*k) != mine.get(*k))
        .map(|k| {
            [
                k.clone(),
                ours.get(k).cloned().unwrap_or_else(missing),
                mine.get(k).cloned().unwrap_or_else(missing),
            ]
        });
    let mut flags = vec![0f64; comm.world()];
    flags[comm.rank()] = f64::from(u8::from(difference.is_some()));
    comm.all_reduce_sum_f64(&mut flags)?;
    let Some(first) = flags.iter().position(|&f| f > 0.0) else {
        return Ok(());
    };
    let mut finding = difference.map(|d| d.join("\0")).unwrap_or_default().into_bytes();
    broadcast_vec(comm, &mut finding, first)?;
    let finding = String::from_utf8_lossy(&finding).into_owned();
    let mut parts = finding.splitn(3, '\0').map(str::to_string);
    let mut next = || parts.next().unwrap_or_else(missing);
    Err(Error::ConfigMismatch {
        rank: first,
        field: next(),
        ours: next(),
        theirs: next(),
    })
}

/// `a.b.c = value` for every leaf of a TOML document.
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        v => {
            out.insert(prefix.to_string(), v.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattening_names_nested_fields() {
        let v: toml::Value = "epochs = 3\n[optimizer]\nkind = \"sgd\"\nmomentum = 0.9\n"
            .parse()
            .expect("toml");
        let mut flat = BTreeMap::new();
        flatten("", &v, &mut flat);
        assert_eq!(flat["optimizer.momentum"], "0.9");
        assert_eq!(flat["epochs"], "3");
        assert_eq!(flat.len(), 3);
    }

    #[test]
    fn every_rank_names_the_field_that_differs() -> anyhow::Result<()> {
        let messages = crate::testing::run_ranks(3, |comm| {
            let lr = if comm.rank() == 2 { "0.2" } else { "0.1" };
            let text = format!("epochs = 1\nseed = {}\n[lr]\nbase = {lr}\n", comm.rank());
            Ok(check_same_config(comm.as_ref(), &text, &["seed"])
                .err()
                .map(|e| e.to_string()))
        })?;
        for (rank, message) in messages.iter().enumerate() {
            let message = message.as_deref().unwrap_or("no error");
            assert!(
                message.contains("rank 2's") && message.contains("`lr.base`: 0.2 on rank 2, 0.1 on rank 0"),
                "rank {rank}: {message}"
            );
        }
        let same = crate::testing::run_ranks(2, |comm| {
            let text = format!("seed = {}\n", comm.rank());
            Ok(check_same_config(comm.as_ref(), &text, &["seed"]).is_ok())
        })?;
        assert_eq!(same, vec![true, true]);
        Ok(())
    }

    #[test]
    fn one_process_needs_no_check() -> anyhow::Result<()> {
        check_same_config(&Local, "epochs = 1", &[])?;
        Ok(())
    }
}
