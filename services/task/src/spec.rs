//! Builds a container's OCI runtime spec (`config.json`) from an image config
//! and the caller's overrides, the way docker does, and prepares the bundle
//! around it.
//!
//! [`build_spec`] is pure apart from reading `/etc/passwd` and `/etc/group` in
//! the rootfs. [`prepare_rootfs`] then creates the working directory and writes
//! `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` into the bundle,
//! bind-mounting them over the image's copies, so the image's files are never
//! rewritten.
//!
//! A container gets docker's defaults unless its caller opts out: the
//! default capability set, masked and read-only paths under `/proc` and
//! `/sys`, `no_new_privileges`, and the default seccomp profile
//! ([`seccomp`]). `privileged` drops all four; `seccomp_unconfined` and
//! `allow_new_privileges` drop one each.
//!
//! # Limitations
//!
//! No AppArmor or SELinux label is applied, and no rlimits are set (the
//! process inherits the shim's).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use oci_spec::OciSpecError;
use serde::{Deserialize, Deserializer};
use thiserror::Error;

pub use rootfs::{prepare_rootfs, resolve_in_root, write_config};
pub use user::{resolve_user, ResolvedUser};

mod rootfs;
pub mod seccomp;
mod user;

/// PATH given to a process whose environment has none, as docker does.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Spec annotation that records the image's stop signal (the key the OCI
/// image spec uses when converting `StopSignal`).
pub const STOP_SIGNAL_ANNOTATION: &str = "org.opencontainers.image.stopSignal";

/// Bundle-relative path of the rootfs in every spec this module builds.
pub const ROOTFS_DIR: &str = "rootfs";

/// Longest hostname the kernel accepts.
const HOST_NAME_MAX: usize = 64;

/// Errors of building a spec or preparing a bundle.
#[derive(Debug, Error)]
pub enum SpecError {
    /// Entrypoint and Cmd (after overrides) are both empty.
    #[error("no command specified for container {container_id:?}")]
    NoCommand {
        /// The container whose process has no args.
        container_id: String,
    },
    /// An environment entry has no `=` or an empty name.
    #[error("invalid environment entry {entry:?}: {reason}")]
    InvalidEnv {
        /// The offending entry.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The working directory is not an absolute path.
    #[error("working directory {path:?} is not absolute")]
    RelativeWorkingDir {
        /// The working directory asked for.
        path: String,
    },
    /// The working directory exists in the rootfs but is not a directory.
    #[error("working directory {path:?} is not a directory")]
    WorkingDirNotDirectory {
        /// The working directory asked for.
        path: PathBuf,
    },
    /// The working directory resolves into `/proc`, which is mounted over.
    #[error("working directory {path:?} resolves into /proc")]
    WorkingDirInProc {
        /// The working directory asked for.
        path: PathBuf,
    },
    /// A path in the rootfs has too many levels of symlinks.
    #[error("too many levels of symlinks resolving {path:?} in the rootfs")]
    SymlinkLoop {
        /// The container path being resolved.
        path: PathBuf,
    },
    /// A user name is not in the image's `/etc/passwd`.
    #[error("user {user:?} not found in /etc/passwd of the image")]
    UserNotFound {
        /// The user name asked for.
        user: String,
    },
    /// A group name is not in the image's `/etc/group`.
    #[error("group {group:?} not found in /etc/group of the image")]
    GroupNotFound {
        /// The group name asked for.
        group: String,
    },
    /// A user string that is not `user`, `uid`, `user:group` or `uid:gid`.
    #[error("invalid user {user:?}")]
    InvalidUser {
        /// The user string asked for.
        user: String,
    },
    /// A stop signal that names no signal.
    #[error("invalid stop signal {signal:?}")]
    InvalidSignal {
        /// The signal asked for.
        signal: String,
    },
    /// A file of the rootfs, the host or the bundle could not be read or written.
    #[error("failed to access {path:?}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The spec builder refused a value.
    #[error("failed to build the runtime spec")]
    Build(#[source] OciSpecError),
    /// A capability name that names none.
    #[error("unknown capability {name:?}")]
    UnknownCapability {
        /// The name asked for.
        name: String,
    },
    /// A bind mount or tmpfs path that is not absolute, or a bind source
    /// that does not exist.
    #[error("invalid mount {path:?}: {reason}")]
    InvalidMount {
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A seccomp profile that cannot be used.
    #[error("invalid seccomp profile: {reason}")]
    Seccomp {
        /// What is wrong with it.
        reason: String,
    },
    /// A negative limit.
    #[error("invalid resource limits {limits:?}: limits are 0 (none) or positive")]
    InvalidLimit {
        /// The limits asked for.
        limits: Limits,
    },
}

impl From<OciSpecError> for SpecError {
    fn from(err: OciSpecError) -> Self {
        SpecError::Build(err)
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> SpecError {
    let path = path.into();
    move |source| SpecError::Io { path, source }
}

/// The process fields of an image config: the `config` object of an OCI
/// image config (or docker's `Config`), with `null` read as empty.
///
/// Other fields (ExposedPorts, Labels, Healthcheck, Shell, OnBuild, ...) are
/// ignored on purpose: they do not change the runtime spec.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub struct ImageConfig {
    /// Executable and leading args; replaced by a caller's entrypoint.
    #[serde(deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    /// Default args after the entrypoint; replaced by the caller's args.
    #[serde(deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
    /// `NAME=value` entries.
    #[serde(deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    /// Absolute working directory; empty means `/`.
    #[serde(deserialize_with = "null_as_default")]
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    #[serde(deserialize_with = "null_as_default")]
    pub user: String,
    /// Signal that stops the container, by name (`SIGQUIT`) or number.
    pub stop_signal: Option<String>,
}

fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

/// The caller's overrides of an image config, as `docker run` takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Replaces the image's Cmd when not empty.
    pub args: Vec<String>,
    /// Replaces the image's Entrypoint, and drops its Cmd unless `args` is set.
    pub entrypoint: Option<Vec<String>>,
    /// `NAME=value` overrides the image's NAME; a bare `NAME` removes it.
    pub env: Vec<String>,
    /// Replaces the image's WorkingDir.
    pub working_dir: Option<String>,
    /// Replaces the image's User.
    pub user: Option<String>,
    /// Container hostname; defaults to the container id (the host's name
    /// with the host network).
    pub hostname: Option<String>,
    /// Share the host's network namespace instead of a loopback-only one.
    pub host_network: bool,
    /// Mount the rootfs read-only.
    pub readonly_rootfs: bool,
    /// Give the process a terminal (the runtime then needs a console socket).
    pub tty: bool,
    /// Host paths bind-mounted into the container.
    pub binds: Vec<Bind>,
    /// Container paths that get a fresh tmpfs.
    pub tmpfs: Vec<String>,
    /// Memory, CPU and process limits.
    pub limits: Limits,
    /// Capabilities added to the default set (`ALL` for every one).
    pub cap_add: Vec<String>,
    /// Capabilities removed from the default set (`ALL` for every one).
    pub cap_drop: Vec<String>,
    /// Every capability and device, no masked or read-only paths, `/sys`
    /// writable, no seccomp filter, no `no_new_privileges`.
    pub privileged: bool,
    /// No seccomp filter (`--security-opt seccomp=unconfined`).
    pub seccomp_unconfined: bool,
    /// The caller's seccomp profile, an OCI `linux.seccomp` object as JSON,
    /// in place of the default one.
    pub seccomp_profile: Option<String>,
    /// Leave `no_new_privileges` off, so setuid binaries and file
    /// capabilities work (`--security-opt no-new-privileges=false`).
    pub allow_new_privileges: bool,
}

/// A host path mounted into the container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bind {
    /// Absolute path on the node.
    pub source: PathBuf,
    /// Absolute path in the container.
    pub destination: String,
    /// Read-only.
    pub readonly: bool,
}

/// Resource limits of a container; 0 means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes (swap included, so the limit is a limit).
    pub memory_bytes: i64,
    /// CPU in thousandths of a CPU.
    pub cpu_millis: i64,
    /// Most processes.
    pub pids: i64,
}

/// The CFS period every CPU limit is expressed in, in microseconds.
const CPU_PERIOD_MICROS: u64 = 100_000;

/// The `linux.resources` of `limits`, over `base` (a spec's existing ones,
/// or the default device rules): only the limits set are written.
pub fn apply_limits(
    mut base: oci_spec::runtime::LinuxResources,
    limits: &Limits,
) -> Result<oci_spec::runtime::LinuxResources, SpecError> {
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder};
    if limits.memory_bytes < 0 || limits.cpu_millis < 0 || limits.pids < 0 {
        return Err(SpecError::InvalidLimit { limits: *limits });
    }
    if limits.memory_bytes > 0 {
        let memory = LinuxMemoryBuilder::default()
            .limit(limits.memory_bytes)
            .swap(limits.memory_bytes)
            .build()?;
        base.set_memory(Some(memory));
    }
    if limits.cpu_millis > 0 {
        let quota = limits.cpu_millis * CPU_PERIOD_MICROS as i64 / 1000;
        let cpu = LinuxCpuBuilder::default()
            .quota(quota.max(1000))
            .period(CPU_PERIOD_MICROS)
            .build()?;
        base.set_cpu(Some(cpu));
    }
    if limits.pids > 0 {
        base.set_pids(Some(
            LinuxPidsBuilder::default().limit(limits.pids).build()?,
        ));
    }
    Ok(base)
}

/// Returns the cgroup path runc creates for a container (cgroup v1 form,
/// relative to the cgroup of the runc process).
pub fn cgroups_path(namespace: &str, container_id: &str) -> String {
    format!("berth/{namespace}/{container_id}")
}

/// Builds the runtime spec of container `container_id` in `namespace` from
/// `image` and the caller's `opts`, reading users from `rootfs`.
///
/// The spec's root is the bundle-relative [`ROOTFS_DIR`]. Errors:
/// [`SpecError::NoCommand`] when the resulting args are empty,
/// [`SpecError::InvalidEnv`] for an entry without `=` or with an empty name,
/// [`SpecError::UserNotFound`] / [`SpecError::GroupNotFound`] for unknown
/// names, [`SpecError::RelativeWorkingDir`], [`SpecError::InvalidSignal`].
pub fn build_spec(
    namespace: &str,
    container_id: &str,
    rootfs: &Path,
    image: &ImageConfig,
    opts: &RunOptions,
) -> Result<Spec, SpecError> {
    let args = process_args(image, opts);
    if args.is_empty() {
        return Err(SpecError::NoCommand {
            container_id: container_id.to_string(),
        });
    }
    let cwd = working_dir(image, opts)?;

    let user_str = opts.user.as_deref().unwrap_or(&image.user);
    let user = resolve_user(rootfs, user_str)?;
    let env = process_env(image, opts, &user)?;

    let caps = capabilities(opts)?;
    let seccomp = seccomp_section(opts, &caps)?;
    // Inheritable and ambient stay empty, as docker leaves them: a process
    // that is not root gains nothing across exec.
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(Capabilities::new())
        .ambient(Capabilities::new())
        .build()?;
    let mut oci_user = UserBuilder::default().uid(user.uid).gid(user.gid);
    if !user.additional_gids.is_empty() {
        oci_user = oci_user.additional_gids(user.additional_gids.clone());
    }
    let process = ProcessBuilder::default()
        .terminal(opts.tty)
        .user(oci_user.build()?)
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(capabilities)
        .no_new_privileges(!(opts.allow_new_privileges || opts.privileged))
        .build()?;

    let mut annotations = HashMap::new();
    if let Some(signal) = image.stop_signal.as_deref().filter(|s| !s.is_empty()) {
        parse_signal(signal)?;
        annotations.insert(STOP_SIGNAL_ANNOTATION.to_string(), signal.to_string());
    }

    Ok(SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(ROOTFS_DIR)
                .readonly(opts.readonly_rootfs)
                .build()?,
        )
        .process(process)
        .hostname(hostname(container_id, opts))
        .mounts(mounts(opts)?)
        .annotations(annotations)
        .linux(linux_section(namespace, container_id, opts, seccomp)?)
        .build()?)
}

/// Docker's rule: the caller's entrypoint replaces the image's and drops its
/// Cmd; the caller's args replace Cmd.
fn process_args(image: &ImageConfig, opts: &RunOptions) -> Vec<String> {
    let entrypoint = opts.entrypoint.as_ref().unwrap_or(&image.entrypoint);
    let cmd: &[String] = if !opts.args.is_empty() {
        &opts.args
    } else if opts.entrypoint.is_some() {
        &[]
    } else {
        &image.cmd
    };
    entrypoint.iter().chain(cmd).cloned().collect()
}

fn working_dir(image: &ImageConfig, opts: &RunOptions) -> Result<String, SpecError> {
    let cwd = opts.working_dir.as_deref().unwrap_or(&image.working_dir);
    if cwd.is_empty() {
        return Ok("/".to_string());
    }
    if !cwd.starts_with('/') {
        return Err(SpecError::RelativeWorkingDir {
            path: cwd.to_string(),
        });
    }
    Ok(cwd.to_string())
}

/// Merges image and caller env (caller wins, a bare caller `NAME` unsets),
/// keeping one entry per name at its first position with the last value, then
/// adds PATH, HOME and (with a terminal) TERM when absent.
fn process_env(
    image: &ImageConfig,
    opts: &RunOptions,
    user: &ResolvedUser,
) -> Result<Vec<String>, SpecError> {
    let mut env: Vec<(String, String)> = Vec::new();
    for entry in &image.env {
        let (name, value) = split_env(entry)?;
        set_env(&mut env, name, value);
    }
    for entry in &opts.env {
        if !entry.contains('=') {
            check_env_name(entry, entry)?;
            env.retain(|(n, _)| n != entry);
            continue;
        }
        let (name, value) = split_env(entry)?;
        set_env(&mut env, name, value);
    }

    if !env.iter().any(|(n, _)| n == "PATH") {
        env.insert(0, ("PATH".to_string(), DEFAULT_PATH.to_string()));
    }
    if !env.iter().any(|(n, _)| n == "HOME") {
        let home = user.home.clone().unwrap_or_else(|| "/".to_string());
        env.push(("HOME".to_string(), home));
    }
    if opts.tty && !env.iter().any(|(n, _)| n == "TERM") {
        env.push(("TERM".to_string(), "xterm".to_string()));
    }
    Ok(env.into_iter().map(|(n, v)| format!("{n}={v}")).collect())
}

fn split_env(entry: &str) -> Result<(&str, &str), SpecError> {
    let Some((name, value)) = entry.split_once('=') else {
        return Err(SpecError::InvalidEnv {
            entry: entry.to_string(),
            reason: "missing '='",
        });
    };
    check_env_name(entry, name)?;
    Ok((name, value))
}

fn check_env_name(entry: &str, name: &str) -> Result<(), SpecError> {
    let reason = if name.is_empty() {
        "empty variable name"
    } else if name.contains('\0') {
        "nul byte in variable name"
    } else {
        return Ok(());
    };
    Err(SpecError::InvalidEnv {
        entry: entry.to_string(),
        reason,
    })
}

fn set_env(env: &mut Vec<(String, String)>, name: &str, value: &str) {
    match env.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value.to_string(),
        None => env.push((name.to_string(), value.to_string())),
    }
}

fn hostname(container_id: &str, opts: &RunOptions) -> String {
    if let Some(name) = &opts.hostname {
        return name.clone();
    }
    if opts.host_network {
        if let Ok(name) = nix::unistd::gethostname() {
            return name.to_string_lossy().into_owned();
        }
    }
    let mut end = container_id.len().min(HOST_NAME_MAX - 1);
    while !container_id.is_char_boundary(end) {
        end -= 1;
    }
    container_id[..end].to_string()
}

/// The capability set docker grants by default.
pub fn default_capabilities() -> Vec<Capability> {
    vec![
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
}

/// Paths docker masks from the container (bind-mounted over with nothing).
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths docker makes read-only in the container.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()?)
}

fn default_mounts() -> Result<Vec<Mount>, SpecError> {
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
    ])
}

/// The seccomp filter of a container holding `caps`: none when privileged
/// or unconfined, the caller's profile when given, else the default one.
fn seccomp_section(
    opts: &RunOptions,
    caps: &Capabilities,
) -> Result<Option<oci_spec::runtime::LinuxSeccomp>, SpecError> {
    if opts.privileged || opts.seccomp_unconfined {
        return Ok(None);
    }
    if let Some(profile) = &opts.seccomp_profile {
        return seccomp::custom_profile(profile).map(Some);
    }
    let profile = seccomp::default_profile(caps)?;
    if profile.is_none() {
        tracing::warn!(
            arch = std::env::consts::ARCH,
            "the default seccomp profile does not cover this architecture; none applied"
        );
    }
    Ok(profile)
}

fn linux_section(
    namespace: &str,
    container_id: &str,
    opts: &RunOptions,
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
) -> Result<oci_spec::runtime::Linux, SpecError> {
    let host_network = opts.host_network;
    let mut kinds = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if !host_network {
        kinds.push(LinuxNamespaceType::Network);
    }
    let namespaces = kinds
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<Result<Vec<_>, _>>()?;

    // Deny every device, then runc appends its default allow list (null,
    // zero, full, tty, random, urandom, ptmx, pts); privileged allows all.
    let devices = LinuxDeviceCgroupBuilder::default()
        .allow(opts.privileged)
        .access("rwm")
        .build()?;
    let resources = LinuxResourcesBuilder::default()
        .devices(vec![devices])
        .build()?;
    let resources = apply_limits(resources, &opts.limits)?;

    let paths = |list: &[&str]| -> Vec<String> {
        if opts.privileged {
            Vec::new()
        } else {
            list.iter().map(|p| p.to_string()).collect()
        }
    };
    let mut linux = LinuxBuilder::default()
        .cgroups_path(cgroups_path(namespace, container_id))
        .namespaces(namespaces)
        .resources(resources)
        .masked_paths(paths(MASKED_PATHS))
        .readonly_paths(paths(READONLY_PATHS));
    if let Some(seccomp) = seccomp {
        linux = linux.seccomp(seccomp);
    }
    Ok(linux.build()?)
}

/// The capability set: docker's defaults with the caller's additions and
/// removals (`ALL` on either side), or every capability when privileged.
fn capabilities(opts: &RunOptions) -> Result<Capabilities, SpecError> {
    use std::collections::HashSet;
    // "Every capability" means every one this service may hand on: runc
    // cannot grant a capability outside its own bounding set.
    let bounding = own_bounding_set();
    let all = || -> HashSet<Capability> {
        all_capabilities()
            .into_iter()
            .filter(|cap| bounding.as_ref().is_none_or(|set| set.contains(cap)))
            .collect()
    };
    if opts.privileged {
        return Ok(all());
    }
    let mut caps: HashSet<Capability> = default_capabilities().into_iter().collect();
    if opts
        .cap_drop
        .iter()
        .any(|name| name.eq_ignore_ascii_case("ALL"))
    {
        caps.clear();
    }
    for name in &opts.cap_add {
        if name.eq_ignore_ascii_case("ALL") {
            caps = all();
        } else {
            caps.insert(parse_capability(name)?);
        }
    }
    for name in &opts.cap_drop {
        if !name.eq_ignore_ascii_case("ALL") {
            caps.remove(&parse_capability(name)?);
        }
    }
    Ok(caps)
}

/// A capability by name, `CAP_NET_ADMIN` or `net_admin`.
pub fn parse_capability(name: &str) -> Result<Capability, SpecError> {
    // The enum's text form is the name without its `CAP_` prefix.
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    Capability::from_str(bare).map_err(|_| SpecError::UnknownCapability {
        name: name.to_string(),
    })
}

/// The capabilities in this process's bounding set (`CapBnd` of
/// `/proc/self/status`); `None` when it cannot be read.
fn own_bounding_set() -> Option<Vec<Capability>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))?;
    let mask = u64::from_str_radix(hex.trim(), 16).ok()?;
    Some(
        all_capabilities()
            .into_iter()
            .filter(|cap| mask & (1 << capability_number(*cap)) != 0)
            .collect(),
    )
}

/// A capability's number in the kernel's masks.
fn capability_number(cap: Capability) -> u32 {
    use Capability::*;
    match cap {
        Chown => 0,
        DacOverride => 1,
        DacReadSearch => 2,
        Fowner => 3,
        Fsetid => 4,
        Kill => 5,
        Setgid => 6,
        Setuid => 7,
        Setpcap => 8,
        LinuxImmutable => 9,
        NetBindService => 10,
        NetBroadcast => 11,
        NetAdmin => 12,
        NetRaw => 13,
        IpcLock => 14,
        IpcOwner => 15,
        SysModule => 16,
        SysRawio => 17,
        SysChroot => 18,
        SysPtrace => 19,
        SysPacct => 20,
        SysAdmin => 21,
        SysBoot => 22,
        SysNice => 23,
        SysResource => 24,
        SysTime => 25,
        SysTtyConfig => 26,
        Mknod => 27,
        Lease => 28,
        AuditWrite => 29,
        AuditControl => 30,
        Setfcap => 31,
        MacOverride => 32,
        MacAdmin => 33,
        Syslog => 34,
        WakeAlarm => 35,
        BlockSuspend => 36,
        AuditRead => 37,
        Perfmon => 38,
        Bpf => 39,
        CheckpointRestore => 40,
    }
}

/// Every capability this kernel interface knows.
fn all_capabilities() -> Vec<Capability> {
    let mut caps = default_capabilities();
    caps.extend([
        Capability::DacReadSearch,
        Capability::LinuxImmutable,
        Capability::NetBroadcast,
        Capability::NetAdmin,
        Capability::IpcLock,
        Capability::IpcOwner,
        Capability::SysModule,
        Capability::SysRawio,
        Capability::SysPtrace,
        Capability::SysPacct,
        Capability::SysAdmin,
        Capability::SysBoot,
        Capability::SysNice,
        Capability::SysResource,
        Capability::SysTime,
        Capability::SysTtyConfig,
        Capability::Lease,
        Capability::AuditControl,
        Capability::MacOverride,
        Capability::MacAdmin,
        Capability::Syslog,
        Capability::WakeAlarm,
        Capability::BlockSuspend,
        Capability::AuditRead,
        Capability::Perfmon,
        Capability::Bpf,
        Capability::CheckpointRestore,
    ]);
    caps
}

/// The default mounts, then the caller's tmpfs and bind mounts (which
/// replace a default at the same destination).
fn mounts(opts: &RunOptions) -> Result<Vec<Mount>, SpecError> {
    let mut mounts = default_mounts()?;
    if opts.privileged {
        for m in mounts
            .iter_mut()
            .filter(|m| m.destination() == Path::new("/sys"))
        {
            let options: Vec<String> = m
                .options()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|o| o != "ro")
                .collect();
            m.set_options(Some(options));
        }
    }
    let mut extra = Vec::new();
    for dest in &opts.tmpfs {
        check_container_path(dest)?;
        extra.push(mount(
            dest,
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777"],
        )?);
    }
    for bind in &opts.binds {
        check_container_path(&bind.destination)?;
        if !bind.source.is_absolute() {
            return Err(SpecError::InvalidMount {
                path: bind.source.to_string_lossy().into_owned(),
                reason: "the source is not an absolute path",
            });
        }
        if !bind.source.exists() {
            return Err(SpecError::InvalidMount {
                path: bind.source.to_string_lossy().into_owned(),
                reason: "the source does not exist on the node",
            });
        }
        let mode = if bind.readonly { "ro" } else { "rw" };
        let source = bind.source.to_string_lossy();
        extra.push(mount(
            &bind.destination,
            "bind",
            &source,
            &["rbind", "rprivate", mode],
        )?);
    }
    mounts.retain(|m| !extra.iter().any(|e| e.destination() == m.destination()));
    mounts.extend(extra);
    Ok(mounts)
}

fn check_container_path(path: &str) -> Result<(), SpecError> {
    if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
        return Err(SpecError::InvalidMount {
            path: path.to_string(),
            reason: "a container path is absolute and has no `..`",
        });
    }
    Ok(())
}

/// Parses a signal given by name (`SIGQUIT`, `quit`) or number (`3`).
///
/// Errors with [`SpecError::InvalidSignal`] for anything else.
pub fn parse_signal(signal: &str) -> Result<i32, SpecError> {
    let invalid = || SpecError::InvalidSignal {
        signal: signal.to_string(),
    };
    if let Ok(number) = signal.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(number)
            .map(|s| s as i32)
            .map_err(|_| invalid());
    }
    let upper = signal.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&name)
        .map(|s| s as i32)
        .map_err(|_| invalid())
}

/// Returns the signal that stops a container built from `spec`: the image's
/// stop signal when recorded, else SIGTERM.
pub fn stop_signal(spec: &Spec) -> i32 {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(STOP_SIGNAL_ANNOTATION))
        .and_then(|s| parse_signal(s).ok())
        .unwrap_or(libc::SIGTERM)
}

#[cfg(test)]
mod tests;
