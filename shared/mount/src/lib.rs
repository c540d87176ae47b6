//! Overlay mounts: how a snapshot is stacked on its parents, and doing it.
//!
//! [`overlay_mount`] describes a snapshot's mount the way the usual overlay
//! snapshotter model does (a [`MountSpec`] is what the service hands to the
//! task service), and [`mount`] / [`unmount`] perform one with mount(2).
//!
//! mount(2) copies at most one page of option data, and a deep image's
//! `lowerdir` list can be longer. Then the mount runs in a forked child that
//! changes into the directory the layers share and names them relative to it.
//! The child is needed because `chdir` in a multi-threaded process would move
//! every thread.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

/// A mount as the snapshot service reports it: enough to call mount(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// `overlay`, or `bind` for a bind mount.
    pub fstype: String,
    /// The mount source: `overlay`, or the directory to bind.
    pub source: String,
    /// Mount options: flags (`ro`, `rw`, `rbind`, `nosuid`, ...) and
    /// filesystem data (`lowerdir=...`, `upperdir=...`, `workdir=...`).
    pub options: Vec<String>,
}

/// Why a mount or unmount failed.
///
/// For the wire code: all are `Internal`, since the paths come from the
/// service's own snapshot records, never from a request.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The options are longer than a page even relative to the common parent.
    #[error("mount options for {target} are {len} bytes, too long even as relative paths")]
    OptionsTooLong {
        /// The mount point.
        target: PathBuf,
        /// Bytes of option data after shortening.
        len: usize,
    },
    /// A path holds a NUL byte, or the mount point is not absolute and the
    /// current directory is unknown.
    #[error("invalid path in mount of {target}")]
    InvalidPath {
        /// The mount point.
        target: PathBuf,
    },
    /// mount(2) failed.
    #[error("failed to mount {fstype} at {target}")]
    Mount {
        /// The filesystem type.
        fstype: String,
        /// The mount point.
        target: PathBuf,
        /// The kernel's answer.
        #[source]
        source: Errno,
    },
    /// umount2(2) failed.
    #[error("failed to unmount {target}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The kernel's answer.
        #[source]
        source: Errno,
    },
    /// The forked mount helper could not be started or waited for.
    #[error("failed to run the mount helper for {target}")]
    Helper {
        /// The mount point.
        target: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Describes the mount of a snapshot.
///
/// `lowers` are the committed parents' directories, top-most first. With no
/// lowers the snapshot's own `upper` is bind mounted (read-only when
/// `readonly`). A read-only view of one parent is a read-only bind of it, and
/// of several an overlay of the lowers alone; `upper` and `work` are then
/// unused. Otherwise it is an overlay with `lowerdir`, `upperdir` and
/// `workdir`. Every overlay gets `index=off`, so layers can be shared by many
/// overlays.
///
/// # Limitations
///
/// Paths are written into the options as UTF-8 and must not hold `,` or `:`,
/// the separators of overlay options; the service's snapshot directories
/// never do.
pub fn overlay_mount(upper: &Path, work: &Path, lowers: &[PathBuf], readonly: bool) -> MountSpec {
    let bind = |dir: &Path| MountSpec {
        fstype: "bind".into(),
        source: dir.to_string_lossy().into_owned(),
        options: vec![if readonly { "ro" } else { "rw" }.into(), "rbind".into()],
    };
    match lowers {
        [] => return bind(upper),
        [only] if readonly => return bind(only),
        _ => {}
    }

    let lowerdir: Vec<_> = lowers.iter().map(|p| p.to_string_lossy()).collect();
    let mut options = Vec::new();
    if readonly {
        options.push("ro".to_string());
    }
    options.push(format!("lowerdir={}", lowerdir.join(":")));
    if !readonly {
        options.push(format!("upperdir={}", upper.to_string_lossy()));
        options.push(format!("workdir={}", work.to_string_lossy()));
    }
    options.push("index=off".into());
    MountSpec {
        fstype: "overlay".into(),
        source: "overlay".into(),
        options,
    }
}

/// Mounts `spec` at `target` with mount(2).
///
/// Overlay options longer than a page are shortened by mounting from a forked
/// child that changes into the layers' common parent directory and names the
/// layers relative to it; the calling process never changes directory.
/// Not idempotent: a second call stacks a second mount.
pub fn mount(spec: &MountSpec, target: &Path) -> Result<(), MountError> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in &spec.options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other),
        }
    }
    let mount_err = |source| MountError::Mount {
        fstype: spec.fstype.clone(),
        target: target.into(),
        source,
    };

    if spec.fstype == "bind" || flags.contains(MsFlags::MS_BIND) {
        // A bind mount ignores MS_RDONLY; read-only takes a remount.
        let bind_flags = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        nix::mount::mount(
            Some(spec.source.as_str()),
            target,
            None::<&str>,
            bind_flags,
            None::<&str>,
        )
        .map_err(mount_err)?;
        let rest = flags - MsFlags::MS_BIND - MsFlags::MS_REC;
        if !rest.is_empty() {
            let remount = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rest;
            nix::mount::mount(None::<&str>, target, None::<&str>, remount, None::<&str>)
                .map_err(mount_err)?;
        }
        return Ok(());
    }

    let data = data.join(",");
    if data.len() < page_size() {
        return nix::mount::mount(
            Some(spec.source.as_str()),
            target,
            Some(spec.fstype.as_str()),
            flags,
            Some(data.as_str()),
        )
        .map_err(mount_err);
    }
    let (common, short) = shorten(&data);
    if short.len() >= page_size() {
        return Err(MountError::OptionsTooLong {
            target: target.into(),
            len: short.len(),
        });
    }
    mount_in_child(spec, target, flags, &common, &short)
}

/// Unmounts `target`, detaching it lazily if it is busy. A path that is not
/// mounted (or does not exist) is fine, so this is idempotent.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(source) => Err(MountError::Unmount {
            target: target.into(),
            source,
        }),
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// Rewrites the `lowerdir`, `upperdir` and `workdir` paths of overlay option
/// data relative to their deepest common directory, returned too.
fn shorten(data: &str) -> (PathBuf, String) {
    let is_path_option = |key: &str| matches!(key, "lowerdir" | "upperdir" | "workdir");
    let mut paths: Vec<&Path> = Vec::new();
    for option in data.split(',') {
        if let Some((key, value)) = option.split_once('=') {
            if is_path_option(key) {
                paths.extend(value.split(':').map(Path::new));
            }
        }
    }
    let common = common_dir(&paths);

    let relative = |path: &str| match Path::new(path).strip_prefix(&common) {
        Ok(rel) if rel.as_os_str().is_empty() => ".".to_string(),
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => path.to_string(),
    };
    let options: Vec<String> = data
        .split(',')
        .map(|option| match option.split_once('=') {
            Some((key, value)) if is_path_option(key) => {
                let value: Vec<String> = value.split(':').map(relative).collect();
                format!("{key}={}", value.join(":"))
            }
            _ => option.to_string(),
        })
        .collect();
    (common, options.join(","))
}

/// The deepest directory holding every path (`/` at worst). Each path's own
/// last component is left out, so a path is never made relative to itself.
fn common_dir(paths: &[&Path]) -> PathBuf {
    let mut common: Option<Vec<Component<'_>>> = None;
    for path in paths {
        let parent: Vec<_> = path
            .parent()
            .unwrap_or(Path::new("/"))
            .components()
            .collect();
        common = Some(match common {
            None => parent,
            Some(prev) => prev
                .iter()
                .zip(&parent)
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| *a)
                .collect(),
        });
    }
    let common: PathBuf = common.unwrap_or_default().into_iter().collect();
    if common.as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        common
    }
}

/// Mounts from a forked child that first changes into `dir`. Everything the
/// child needs is prepared before the fork, because after fork in a
/// multi-threaded process only async-signal-safe calls are allowed.
fn mount_in_child(
    spec: &MountSpec,
    target: &Path,
    flags: MsFlags,
    dir: &Path,
    data: &str,
) -> Result<(), MountError> {
    let invalid = || MountError::InvalidPath {
        target: target.into(),
    };
    let target_abs = if target.is_absolute() {
        target.to_path_buf()
    } else {
        std::env::current_dir().map_err(|_| invalid())?.join(target)
    };
    let dir_c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| invalid())?;
    let target_c = CString::new(target_abs.as_os_str().as_bytes()).map_err(|_| invalid())?;
    let source_c = CString::new(spec.source.as_bytes()).map_err(|_| invalid())?;
    let fstype_c = CString::new(spec.fstype.as_bytes()).map_err(|_| invalid())?;
    let data_c = CString::new(data).map_err(|_| invalid())?;

    // SAFETY: the child calls only chdir, mount and _exit (all
    // async-signal-safe) on memory prepared before the fork, and reads errno.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            if libc::chdir(dir_c.as_ptr()) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            let rc = libc::mount(
                source_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                flags.bits(),
                data_c.as_ptr().cast(),
            );
            libc::_exit(if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            });
        }
    }
    let helper_err = |source| MountError::Helper {
        target: target.into(),
        source,
    };
    if pid < 0 {
        return Err(helper_err(io::Error::last_os_error()));
    }

    // The child's exit code is 0 or the errno of the call that failed.
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; status is a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(helper_err(err));
        }
    }
    if !libc::WIFEXITED(status) {
        return Err(helper_err(io::Error::other("mount helper was killed")));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        errno => Err(MountError::Mount {
            fstype: spec.fstype.clone(),
            target: target.into(),
            source: Errno::from_raw(errno),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn mounts_follow_the_snapshotter_model() {
        let (upper, work) = (Path::new("/s/3/fs"), Path::new("/s/3/work"));

        let rw = overlay_mount(upper, work, &paths(&["/s/2/fs", "/s/1/fs"]), false);
        assert_eq!(rw.fstype, "overlay");
        assert_eq!(
            rw.options,
            [
                "lowerdir=/s/2/fs:/s/1/fs",
                "upperdir=/s/3/fs",
                "workdir=/s/3/work",
                "index=off"
            ]
        );

        let view = overlay_mount(upper, work, &paths(&["/s/2/fs", "/s/1/fs"]), true);
        assert_eq!(
            view.options,
            ["ro", "lowerdir=/s/2/fs:/s/1/fs", "index=off"]
        );

        let one = overlay_mount(upper, work, &paths(&["/s/1/fs"]), true);
        assert_eq!(
            (one.fstype.as_str(), one.source.as_str()),
            ("bind", "/s/1/fs")
        );
        assert_eq!(one.options, ["ro", "rbind"]);

        let base = overlay_mount(upper, work, &[], false);
        assert_eq!(
            (base.fstype.as_str(), base.source.as_str()),
            ("bind", "/s/3/fs")
        );
        assert_eq!(base.options, ["rw", "rbind"]);
    }

    #[test]
    fn long_options_become_relative_to_the_common_parent() {
        let data = "lowerdir=/root/snapshots/2/fs:/root/snapshots/1/fs,upperdir=/root/snapshots/3/fs,workdir=/root/snapshots/3/work,index=off";
        let (common, short) = shorten(data);
        assert_eq!(common, Path::new("/root/snapshots"));
        assert_eq!(
            short,
            "lowerdir=2/fs:1/fs,upperdir=3/fs,workdir=3/work,index=off"
        );
    }
}
