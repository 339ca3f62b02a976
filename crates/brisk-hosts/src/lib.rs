//! Simulated hosts on one machine, for multi-host MPI runs in tests and measurements:
//! each host is a network namespace (and, for every process started on it, a UTS
//! namespace with the host's own name), two hosts are joined by a veth pair on addresses
//! of their own, and `mpirun` launches across them with a hostfile, OpenMPI's remote
//! launch going through `ip netns exec` (its rsh agent setting) instead of ssh.
//!
//! Needs root, iproute2's `ip`, util-linux's `unshare` and a kernel that allows network
//! namespaces; [`Hosts::create`] says which is missing. [`skipped`] records a test that
//! could not run, so the test gate lists it instead of passing it silently.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

mod error;

pub use error::{Error, Result};

/// The hosts' subnet (private to their namespaces, so every set of hosts can use it).
pub const SUBNET: &str = "10.77.0.0/24";

/// Environment variable naming a folder where [`skipped`] records skipped tests.
pub const SKIP_DIR_VAR: &str = "BRISK_SKIP_DIR";

/// Two simulated hosts, `h1` (10.77.0.1) and `h2` (10.77.0.2). Dropping them kills every
/// process left on them and removes the namespaces.
#[derive(Debug)]
pub struct Hosts {
    namespaces: [String; 2],
    dir: tempfile::TempDir,
}

/// The hosts' names and addresses.
pub const NAMES: [&str; 2] = ["h1", "h2"];
pub const ADDRESSES: [&str; 2] = ["10.77.0.1", "10.77.0.2"];

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs `ip ARGS`, an error naming the step when it fails.
fn ip(args: &[&str]) -> Result<Output> {
    let out = Command::new("ip").args(args).output().map_err(|e| Error::Step {
        what: format!("ip {}", args.join(" ")),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Step {
            what: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    })
}

impl Hosts {
    /// Makes two hosts with `slots` MPI slots each.
    pub fn create(slots: usize) -> Result<Hosts> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(Error::Unavailable("network namespaces need root".into()));
        }
        for (tool, arg) in [("ip", "-V"), ("unshare", "--version"), ("mpirun", "--version")] {
            if Command::new(tool).arg(arg).output().is_err() {
                return Err(Error::Unavailable(format!("`{tool}` is not installed")));
            }
        }
        let id = format!(
            "bk{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let namespaces = [format!("{id}h1"), format!("{id}h2")];
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            what: "cannot create a folder in",
            path: std::env::temp_dir(),
            source,
        })?;
        // From here on, Drop cleans up whatever was made.
        let hosts = Hosts { namespaces, dir };
        hosts.connect(&id)?;
        write(
            &hosts.hostfile(),
            &NAMES.map(|n| format!("{n} slots={slots}\n")).concat(),
        )?;
        hosts.write_agent()?;
        // The UTS namespace is the last thing a kernel might refuse.
        let probe = hosts.on(0, "true").output().map_err(|e| Error::Step {
            what: "ip netns exec".into(),
            detail: e.to_string(),
        })?;
        if !probe.status.success() {
            return Err(Error::Unavailable(format!(
                "cannot start a process on a simulated host: {}",
                String::from_utf8_lossy(&probe.stderr).trim()
            )));
        }
        Ok(hosts)
    }

    /// Makes both namespaces, joins them with a veth pair on the hosts' addresses and
    /// makes the names resolve on each.
    fn connect(&self, id: &str) -> Result<()> {
        if let Err(e) = ip(&["netns", "add", &self.namespaces[0]]) {
            return Err(Error::Unavailable(format!(
                "the kernel refused a network namespace ({e})"
            )));
        }
        ip(&["netns", "add", &self.namespaces[1]])?;
        let veth = [format!("{id}a"), format!("{id}b")];
        ip(&["link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1]])
            .map_err(|e| Error::Unavailable(format!("the kernel refused a veth pair ({e})")))?;
        let hosts_file: String = std::iter::once("127.0.0.1 localhost\n".to_string())
            .chain(NAMES.iter().zip(ADDRESSES).map(|(n, a)| format!("{a} {n}\n")))
            .collect();
        for k in 0..2 {
            let ns = &self.namespaces[k];
            ip(&["link", "set", &veth[k], "netns", ns])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", ADDRESSES[k]),
                "dev",
                &veth[k],
            ])?;
            ip(&["-n", ns, "link", "set", &veth[k], "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // `ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts: the names
            // resolve on every host.
            let etc = Path::new("/etc/netns").join(ns);
            std::fs::create_dir_all(&etc).map_err(|source| Error::Io {
                what: "cannot create",
                path: etc.clone(),
                source,
            })?;
            write(&etc.join("hosts"), &hosts_file)?;
        }
        Ok(())
    }

    /// Writes OpenMPI's rsh agent: called as `agent HOST COMMAND…`, where the command is
    /// meant for a shell on HOST, it runs it on the simulated host under its name.
    fn write_agent(&self) -> Result<()> {
        let agent = format!(
            "#!/bin/sh\n# OpenMPI's remote launch onto a simulated host.\nhost=\"$1\"; shift\n\
             case \"$host\" in\n  {n0}|{a0}) ns={ns0}; host={n0} ;;\n  {n1}|{a1}) ns={ns1}; host={n1} ;;\n\
             \x20 *) echo \"unknown simulated host $host\" >&2; exit 1 ;;\nesac\n\
             exec ip netns exec \"$ns\" unshare --uts sh -c \"hostname $host && $*\"\n",
            n0 = NAMES[0],
            n1 = NAMES[1],
            a0 = ADDRESSES[0],
            a1 = ADDRESSES[1],
            ns0 = self.namespaces[0],
            ns1 = self.namespaces[1],
        );
        let path = self.agent();
        write(&path, &agent)?;
        let io = |what, source| Error::Io {
            what,
            path: path.clone(),
            source,
        };
        let mut perms = std::fs::metadata(&path)
            .map_err(|e| io("cannot read", e))?
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).map_err(|e| io("cannot make executable", e))
    }

    /// The hostfile: each host with its slots.
    pub fn hostfile(&self) -> PathBuf {
        self.dir.path().join("hostfile")
    }

    fn agent(&self) -> PathBuf {
        self.dir.path().join("netns-agent")
    }

    /// `program` started on host `k` (0 or 1), under the host's name; add its arguments.
    pub fn on(&self, k: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.namespaces[k],
            "unshare",
            "--uts",
            "sh",
            "-c",
        ])
        .arg(format!("hostname {} && exec \"$@\"", NAMES[k]))
        .args(["sh", program]);
        c
    }

    /// `mpirun -np NP` started on h1 with the hostfile, launching on h2 through the
    /// namespace agent and talking over the hosts' subnet only; add the transport
    /// (`--mca btl tcp,self` leaves TCP the only way between ranks) and the program.
    /// Ranks are not bound to cores: the simulated hosts share the machine's cores, and
    /// each host's daemon would bind its first rank to the same core 0.
    pub fn mpirun(&self, np: usize) -> Command {
        let mut c = self.on(0, "mpirun");
        c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .args(["--bind-to", "none"])
            .arg("--hostfile")
            .arg(self.hostfile())
            .args(["-np", &np.to_string()])
            .args(["--mca", "plm_rsh_agent"])
            .arg(self.agent())
            .args(["--mca", "oob_tcp_if_include", SUBNET])
            .args(["--mca", "btl_tcp_if_include", SUBNET]);
        c
    }

    /// The processes running on host `k`.
    pub fn pids(&self, k: usize) -> Vec<i32> {
        ip(&["netns", "pids", &self.namespaces[k]])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills every process on host `k` (SIGKILL), as a host that dies; how many.
    pub fn kill(&self, k: usize) -> usize {
        let pids = self.pids(k);
        for &pid in &pids {
            // SAFETY: kill(2) of a process in a namespace this harness made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        pids.len()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for k in 0..2 {
            self.kill(k);
        }
        for ns in &self.namespaces {
            // Deleting a namespace deletes its end of the veth pair, and so the pair.
            let _ = ip(&["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

/// Records that `test` did not run and why: on stderr, and in `$BRISK_SKIP_DIR/TEST`
/// when the variable is set (`cargo xtask test` sets it and lists what was skipped).
pub fn skipped(test: &str, why: &str) {
    record_skip(
        std::env::var_os(SKIP_DIR_VAR).map(PathBuf::from).as_deref(),
        test,
        why,
    );
}

fn record_skip(dir: Option<&Path>, test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    if let Some(dir) = dir {
        let _ = std::fs::create_dir_all(dir);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(test))
        {
            let _ = writeln!(f, "{why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_recorded_where_the_gate_looks() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        record_skip(Some(dir.path()), "some_test", "no namespaces here");
        let text = std::fs::read_to_string(dir.path().join("some_test"))?;
        assert_eq!(text.trim(), "no namespaces here");
        Ok(())
    }

    #[test]
    fn two_hosts_have_their_own_names_and_reach_each_other(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let hosts = match Hosts::create(1) {
            Ok(h) => h,
            Err(Error::Unavailable(why)) => {
                skipped(
                    "brisk_hosts::two_hosts_have_their_own_names_and_reach_each_other",
                    &why,
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        for (k, name) in NAMES.iter().enumerate() {
            let out = hosts.on(k, "hostname").output()?;
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), *name);
        }
        // mpirun across both: each rank reports its host.
        let out = hosts
            .mpirun(2)
            .args(["sh", "-c", "echo $(hostname) $OMPI_COMM_WORLD_RANK"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["h1 0", "h2 1"]);
        Ok(())
    }
}
