//! One cgroup per worker, with the limits the operator asked for (`--memory-max`,
//! `--pids-max`, `--cpu-weight`), when the supervisor's cgroup is delegated to it.
//!
//! - **cgroup v2** (systemd hosts; `Delegate=yes` in the unit): the supervisor's own cgroup
//!   becomes a small tree. The supervisor moves itself into `supervisor/` (v2 allows
//!   processes only in leaves), enables the controllers for the subtree, and puts each worker
//!   in `worker-N/` with `memory.max`, `pids.max` and `cpu.weight`.
//! - **cgroup v1**: under the supervisor's cgroup in each controller's hierarchy, a
//!   `vhostbox-PID-worker-N` cgroup with `memory.limit_in_bytes`, `pids.max` and `cpu.shares`.
//!
//! The worker is moved in by the supervisor before it runs a single instruction of its own (it
//! waits on the start pipe), and its cgroup is removed once it has been reaped. Without any of
//! the flags no cgroup is made, and the workers stay in the supervisor's cgroup; asking for a
//! limit where the cgroup cannot be written is a usage error at start.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The limits asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    /// cgroup v2 weight, 1-10000 (100 is the default share).
    pub cpu_weight: Option<u64>,
}

impl CgroupLimits {
    pub fn any(&self) -> bool {
        self.memory_max.is_some() || self.pids_max.is_some() || self.cpu_weight.is_some()
    }
}

/// Why the per-worker cgroups cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup file system for the {0} controller (is it mounted?)")]
    NoController(&'static str),
    #[error("cannot write {0}: is the cgroup delegated to this process (systemd Delegate=yes)?")]
    Write(PathBuf, #[source] io::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
}

/// Where the workers' cgroups go.
#[derive(Debug, Clone)]
pub enum Cgroups {
    V2 {
        base: PathBuf,
        limits: CgroupLimits,
    },
    V1 {
        /// (controller, the supervisor's cgroup in its hierarchy)
        dirs: Vec<(&'static str, PathBuf)>,
        limits: CgroupLimits,
    },
}

/// A worker's cgroup directories, removed when dropped (after the worker was reaped).
#[derive(Debug)]
pub struct WorkerCgroup(Vec<PathBuf>);

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        for d in &self.0 {
            if let Err(e) = fs::remove_dir(d) {
                log::warn!("cannot remove the worker's cgroup {}: {e}", d.display());
            }
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|e| CgroupError::Write(path.to_owned(), e))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| CgroupError::Read(path.to_owned(), e))
}

/// Mount points of cgroup file systems: (fstype, super options, mount point).
fn cgroup_mounts() -> Result<Vec<(String, String, PathBuf)>, CgroupError> {
    let info = read(Path::new("/proc/self/mountinfo"))?;
    Ok(info
        .lines()
        .filter_map(|l| {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            let mut p = post.split_whitespace();
            let fstype = p.next()?;
            let sopts = p.nth(1).unwrap_or("");
            fstype
                .starts_with("cgroup")
                .then(|| (fstype.to_owned(), sopts.to_owned(), PathBuf::from(mount)))
        })
        .collect())
}

impl Cgroups {
    /// Sets up the tree for `limits`; None when no limit is asked for.
    pub fn setup(limits: CgroupLimits) -> Result<Option<Cgroups>, CgroupError> {
        if !limits.any() {
            return Ok(None);
        }
        let own = read(Path::new("/proc/self/cgroup"))?;
        let mounts = cgroup_mounts()?;
        let v2_path = own.lines().find_map(|l| l.strip_prefix("0::"));
        let v2_mount = mounts.iter().find(|m| m.0 == "cgroup2").map(|m| &m.2);
        let wanted = Self::controllers(&limits);
        if let (Some(path), Some(mount)) = (v2_path, v2_mount) {
            let base = mount.join(path.trim_start_matches('/'));
            let have = read(&base.join("cgroup.controllers")).unwrap_or_default();
            if wanted
                .iter()
                .all(|c| have.split_whitespace().any(|h| h == *c))
            {
                return Self::setup_v2(base, limits).map(Some);
            }
        }
        let mut dirs = Vec::new();
        for c in wanted {
            let mount = mounts
                .iter()
                .find(|m| m.0 == "cgroup" && m.1.split(',').any(|o| o == c))
                .ok_or(CgroupError::NoController(c))?;
            let path = own
                .lines()
                .find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, list, path) = (f.next()?, f.next()?, f.next()?);
                    list.split(',').any(|x| x == c).then_some(path)
                })
                .ok_or(CgroupError::NoController(c))?;
            dirs.push((c, mount.2.join(path.trim_start_matches('/'))));
        }
        Ok(Some(Cgroups::V1 { dirs, limits }))
    }

    fn controllers(limits: &CgroupLimits) -> Vec<&'static str> {
        let mut v = Vec::new();
        if limits.memory_max.is_some() {
            v.push("memory");
        }
        if limits.pids_max.is_some() {
            v.push("pids");
        }
        if limits.cpu_weight.is_some() {
            v.push("cpu");
        }
        v
    }

    fn setup_v2(base: PathBuf, limits: CgroupLimits) -> Result<Cgroups, CgroupError> {
        let me = base.join("supervisor");
        if !me.exists() {
            fs::create_dir(&me).map_err(|e| CgroupError::Write(me.clone(), e))?;
        }
        write(&me.join("cgroup.procs"), &std::process::id().to_string())?;
        let enable: Vec<String> = Self::controllers(&limits)
            .iter()
            .map(|c| format!("+{c}"))
            .collect();
        write(&base.join("cgroup.subtree_control"), &enable.join(" "))?;
        Ok(Cgroups::V2 { base, limits })
    }

    /// Makes worker `generation`'s cgroup with the limits and moves `pid` into it.
    pub fn add_worker(&self, pid: i32, generation: u64) -> Result<WorkerCgroup, CgroupError> {
        let mk = |d: &Path| {
            fs::create_dir(d).map_err(|e| CgroupError::Write(d.to_owned(), e))?;
            Ok::<_, CgroupError>(d.to_owned())
        };
        let mut made = WorkerCgroup(Vec::new());
        match self {
            Cgroups::V2 { base, limits } => {
                let d = mk(&base.join(format!("worker-{generation}")))?;
                made.0.push(d.clone());
                if let Some(m) = limits.memory_max {
                    write(&d.join("memory.max"), &m.to_string())?;
                    // No swap: the limit is the worker's whole memory.
                    let _ = fs::write(d.join("memory.swap.max"), "0");
                }
                if let Some(p) = limits.pids_max {
                    write(&d.join("pids.max"), &p.to_string())?;
                }
                if let Some(w) = limits.cpu_weight {
                    write(&d.join("cpu.weight"), &w.to_string())?;
                }
                write(&d.join("cgroup.procs"), &pid.to_string())?;
            }
            Cgroups::V1 { dirs, limits } => {
                let name = format!("vhostbox-{}-worker-{generation}", std::process::id());
                for (c, parent) in dirs {
                    let d = mk(&parent.join(&name))?;
                    made.0.push(d.clone());
                    match *c {
                        "memory" => {
                            let m = limits.memory_max.unwrap_or(u64::MAX).to_string();
                            write(&d.join("memory.limit_in_bytes"), &m)?;
                            let _ = fs::write(d.join("memory.memsw.limit_in_bytes"), &m);
                        }
                        "pids" => {
                            let p = limits.pids_max.map_or("max".into(), |p| p.to_string());
                            write(&d.join("pids.max"), &p)?;
                        }
                        _ => {
                            // v2 weight 100 is v1's default of 1024 shares.
                            let w = limits.cpu_weight.unwrap_or(100);
                            write(&d.join("cpu.shares"), &(w * 1024 / 100).max(2).to_string())?;
                        }
                    }
                    write(&d.join("cgroup.procs"), &pid.to_string())?;
                }
            }
        }
        Ok(made)
    }
}
