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
//! # Limitations
//!
//! No seccomp profile, AppArmor or SELinux label is applied, and no rlimits
//! are set (the process inherits the shim's).

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

    let caps: Capabilities = default_capabilities().into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
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
        .no_new_privileges(false)
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
        .mounts(default_mounts()?)
        .annotations(annotations)
        .linux(linux_section(namespace, container_id, opts.host_network)?)
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

fn linux_section(
    namespace: &str,
    container_id: &str,
    host_network: bool,
) -> Result<oci_spec::runtime::Linux, SpecError> {
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
    // zero, full, tty, random, urandom, ptmx, pts).
    let deny_all = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?;
    let resources = LinuxResourcesBuilder::default()
        .devices(vec![deny_all])
        .build()?;

    Ok(LinuxBuilder::default()
        .cgroups_path(cgroups_path(namespace, container_id))
        .namespaces(namespaces)
        .resources(resources)
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
        )
        .build()?)
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
