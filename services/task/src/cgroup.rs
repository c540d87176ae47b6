//! What a task's cgroup counted: CPU, memory, processes, block I/O and OOM
//! kills, read with `cgroups-rs` on cgroup v1 and v2.
//!
//! runc creates the cgroup from the spec's `cgroupsPath`; where it lands in
//! each hierarchy is read back from `/proc/<init pid>/cgroup` once, at
//! create, and kept in the task record ([`Paths`]).

use std::collections::{BTreeMap, HashMap};

use cgroups_rs::fs::blkio::BlkIoController;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{hierarchies, Cgroup, MaxValue};

use berth_proto::task::MetricsReply;

/// Where a task's cgroup is in each hierarchy, as `/proc/<pid>/cgroup`
/// names it: controller -> path (`""` for the v2 unified hierarchy). On v1
/// the controllers may sit at different depths (the memory hierarchy of a
/// process in a memory-limited session, say), so each keeps its own path.
pub type Paths = BTreeMap<String, String>;

/// The cgroup paths of `pid`; empty when the process is gone.
pub fn of_pid(pid: u32) -> Paths {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut paths = Paths::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        for controller in controllers.split(',') {
            paths.insert(controller.to_string(), path.to_string());
        }
    }
    paths
}

/// The task's cgroup: each v1 controller at its own path. `suffix` is the
/// `cgroupsPath` the spec gave runc, which every controller's path ends in.
fn load(paths: &Paths, suffix: &str) -> Cgroup {
    let suffix = suffix.trim_start_matches('/');
    let hierarchy = hierarchies::auto();
    if hierarchy.v2() {
        let path = paths.get("").map(String::as_str).unwrap_or(suffix);
        return Cgroup::load(hierarchy, path.trim_start_matches('/'));
    }
    let prefixes: HashMap<String, String> = paths
        .iter()
        .filter_map(|(controller, path)| {
            let prefix = path.trim_start_matches('/').strip_suffix(suffix)?;
            Some((controller.clone(), prefix.trim_end_matches('/').to_string()))
        })
        .collect();
    Cgroup::load_with_relative_paths(hierarchy, suffix, prefixes)
}

/// Times the OOM killer killed a process of the cgroup.
///
/// Read from the one file that counts them when the usual mount points
/// have it: loading the cgroup reads the mount table and a dozen memory
/// files, and this runs between a task's exit and its event.
pub fn oom_kills(paths: &Paths, suffix: &str) -> u64 {
    let counted = if let Some(path) = paths.get("memory") {
        let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        std::fs::read_to_string(dir.join("memory.oom_control"))
    } else if let Some(path) = paths.get("") {
        std::fs::read_to_string(unified_file(path, "memory.events"))
    } else {
        Err(std::io::ErrorKind::NotFound.into())
    };
    if let Ok(text) = counted {
        return stat_value(&text, "oom_kill");
    }
    let cgroup = load(paths, suffix);
    if cgroup.v2() {
        let path = paths.get("").map(String::as_str).unwrap_or(suffix);
        return read_key(&unified_file(path, "memory.events"), "oom_kill");
    }
    cgroup
        .controller_of::<MemController>()
        .map(|memory| memory.memory_stat().oom_control.oom_kill)
        .unwrap_or(0)
}

/// Everything the cgroup counted, as the `metrics` op reports it.
pub fn metrics(paths: &Paths, suffix: &str) -> MetricsReply {
    let cgroup = load(paths, suffix);
    let mut reply = MetricsReply {
        oom_kills: oom_kills(paths, suffix),
        ..Default::default()
    };
    if let Some(memory) = cgroup.controller_of::<MemController>() {
        let stat = memory.memory_stat();
        reply.memory_usage_bytes = stat.usage_in_bytes;
        // An unlimited cgroup reports a huge number (v1) or nothing (v2).
        reply.memory_limit_bytes = match stat.limit_in_bytes {
            limit if limit <= 0 || limit >= i64::MAX / 2 => 0,
            limit => limit as u64,
        };
    }
    if cgroup.v2() {
        let usage_usec = cgroup
            .controller_of::<CpuController>()
            .map(|cpu| stat_value(&cpu.cpu().stat, "usage_usec"))
            .unwrap_or(0);
        reply.cpu_usage_nanos = usage_usec * 1000;
    } else if let Some(cpuacct) = cgroup.controller_of::<CpuAcctController>() {
        reply.cpu_usage_nanos = cpuacct.cpuacct().usage;
    }
    if let Some(pids) = cgroup.controller_of::<PidController>() {
        reply.pids_current = pids.get_pid_current().unwrap_or(0);
        reply.pids_limit = match pids.get_pid_max() {
            Ok(MaxValue::Value(limit)) if limit > 0 => limit as u64,
            _ => 0,
        };
    }
    if let Some(blkio) = cgroup.controller_of::<BlkIoController>() {
        let io = blkio.blkio();
        let services = if cgroup.v2() {
            io.io_stat
                .iter()
                .map(|device| (device.rbytes, device.wbytes))
                .collect::<Vec<_>>()
        } else {
            io.io_service_bytes_recursive
                .iter()
                .map(|device| (device.read, device.write))
                .collect()
        };
        for (read, write) in services {
            reply.io_read_bytes += read;
            reply.io_write_bytes += write;
        }
    }
    reply
}

/// Removes the directories above a deleted task's cgroup that berth's
/// layout made (`berth/<namespace>` and `berth`) once they are empty: runc
/// removes the task's own directory but not its parents. A directory still
/// in use by another task stays (rmdir refuses it).
///
/// # Limitations
/// A task created in the same namespace at that very moment can find its
/// freshly made parent removed under it, and runc then fails its create; the
/// create can be retried.
pub fn remove_parents(paths: &Paths, suffix: &str) {
    let mounts = mount_points();
    let suffix = suffix.trim_matches('/');
    // Only the layout's own levels, never a directory above it.
    let levels = suffix.split('/').count().saturating_sub(1);
    for (controller, path) in paths {
        let Some(mount) = mounts.get(controller) else {
            continue;
        };
        let Some(prefix) = path.trim_start_matches('/').strip_suffix(suffix) else {
            continue;
        };
        let mut dir = mount.join(prefix.trim_end_matches('/')).join(suffix);
        for _ in 0..levels {
            if !dir.pop() || std::fs::remove_dir(&dir).is_err() {
                break;
            }
        }
    }
}

/// Where each controller's hierarchy is mounted (`""` for cgroup v2), from
/// `/proc/self/mountinfo`.
fn mount_points() -> HashMap<String, std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or_default();
        let mut right = right.split(' ');
        let (Some(fstype), _, Some(options)) = (right.next(), right.next(), right.next()) else {
            continue;
        };
        match fstype {
            "cgroup2" => {
                out.entry(String::new())
                    .or_insert_with(|| mount_point.into());
            }
            "cgroup" => {
                for option in options.split(',').filter(|o| *o != "rw" && *o != "ro") {
                    out.entry(option.to_string())
                        .or_insert_with(|| mount_point.into());
                }
            }
            _ => {}
        }
    }
    out
}

fn unified_file(path: &str, name: &str) -> std::path::PathBuf {
    std::path::Path::new("/sys/fs/cgroup")
        .join(path.trim_start_matches('/'))
        .join(name)
}

/// The value of `key` in a flat-keyed file (`key value` per line).
fn read_key(file: &std::path::Path, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .map(|text| stat_value(&text, key))
        .unwrap_or(0)
}

fn stat_value(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(name, _)| *name == key)
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_is_found_and_read() {
        let paths = of_pid(std::process::id());
        let memory = paths
            .get("memory")
            .or(paths.get(""))
            .expect("a cgroup")
            .clone();
        // This process uses memory, so its cgroup counts some.
        assert!(metrics(&paths, &memory).memory_usage_bytes > 0);
    }

    #[test]
    fn mount_points_name_the_controllers() {
        let mounts = mount_points();
        let own = of_pid(std::process::id());
        // Every controller this process sits in is mounted somewhere.
        assert!(
            own.keys().any(|controller| mounts.contains_key(controller)),
            "{mounts:?}"
        );
    }

    #[test]
    fn flat_keyed_files_parse() {
        let text = "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n";
        assert_eq!(stat_value(text, "oom_kill"), 1);
        assert_eq!(stat_value(text, "missing"), 0);
    }
}
