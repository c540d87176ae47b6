//! Paths inside a rootfs, and the bundle files around it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::{io_err, mount, SpecError};

/// Symlinks followed while resolving one path inside a rootfs, as the kernel.
const MAX_SYMLINKS: usize = 40;

/// Resolves container path `path` inside `root`, following symlinks as the
/// container would see them (absolute targets restart at `root`, `..` never
/// leaves it). Missing trailing components are kept as named. Returns the
/// resolved container path, always absolute.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, SpecError> {
    let mut pending: VecDeque<OsString> = components(path);
    let mut resolved = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let host = host_path(root, &candidate);
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(SpecError::SymlinkLoop {
                        path: path.to_path_buf(),
                    });
                }
                let target = fs::read_link(&host).map_err(io_err(&host))?;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for part in components(&target).into_iter().rev() {
                    pending.push_front(part);
                }
            }
            Ok(_) => resolved = candidate,
            // A missing component, or one below a non-directory, is kept as
            // named: the caller decides what a missing path means.
            Err(e) if e.kind() == io::ErrorKind::NotFound => resolved = candidate,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => resolved = candidate,
            Err(e) => return Err(io_err(host)(e)),
        }
    }
    Ok(resolved)
}

/// Normal and `..` components of a path; `.` and the root drop out.
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Host path of a resolved, absolute container path.
pub(super) fn host_path(root: &Path, container_path: &Path) -> PathBuf {
    root.join(container_path.strip_prefix("/").unwrap_or(container_path))
}

/// Prepares a bundle for `spec`: creates the working directory in `rootfs`
/// when missing (mode 0755), and writes `hostname`, `hosts` and `resolv.conf`
/// into `bundle`, adding bind mounts over `/etc/...` for each one the image
/// lacks or has as a regular file (a symlink or directory there is left alone).
///
/// Errors: [`SpecError::WorkingDirNotDirectory`] when the working directory
/// exists as something else, [`SpecError::WorkingDirInProc`] when it resolves
/// into `/proc`, [`SpecError::Io`] on a failed read or write. Idempotent: a
/// second call rewrites the files and adds no duplicate mounts.
pub fn prepare_rootfs(bundle: &Path, rootfs: &Path, spec: &mut Spec) -> Result<(), SpecError> {
    let cwd = spec
        .process()
        .as_ref()
        .map(|p| p.cwd().clone())
        .unwrap_or_else(|| PathBuf::from("/"));
    ensure_working_dir(rootfs, &cwd)?;

    let hostname = spec.hostname().clone().unwrap_or_default();
    let host_network = !spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
    let readonly = spec.root().as_ref().and_then(|r| r.readonly()) == Some(true);

    let hosts = if host_network {
        fs::read_to_string("/etc/hosts").map_err(io_err("/etc/hosts"))?
    } else {
        format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    };
    let resolv = match fs::read("/etc/resolv.conf") {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("/etc/resolv.conf")(e)),
    };
    let files: [(&str, Vec<u8>); 3] = [
        ("hostname", format!("{hostname}\n").into_bytes()),
        ("hosts", hosts.into_bytes()),
        ("resolv.conf", resolv),
    ];

    for (name, contents) in files {
        let dest = format!("/etc/{name}");
        if !wants_bind(rootfs, name)? {
            continue;
        }
        let source = bundle.join(name);
        fs::write(&source, contents).map_err(io_err(&source))?;
        let mut options = vec!["rbind", "rprivate"];
        if readonly {
            options.push("ro");
        }
        let bind = mount(&dest, "bind", &source.to_string_lossy(), &options)?;
        let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
        mounts.retain(|m| m.destination() != Path::new(&dest));
        mounts.push(bind);
    }
    Ok(())
}

/// Whether `/etc/<name>` of the image is absent or a regular file; the last
/// component is not followed, so a symlink counts as present.
fn wants_bind(rootfs: &Path, name: &str) -> Result<bool, SpecError> {
    let etc = host_path(rootfs, &resolve_in_root(rootfs, Path::new("/etc"))?);
    let host = etc.join(name);
    match fs::symlink_metadata(&host) {
        Ok(meta) => Ok(meta.file_type().is_file()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io_err(host)(e)),
    }
}

fn ensure_working_dir(rootfs: &Path, cwd: &Path) -> Result<(), SpecError> {
    let resolved = resolve_in_root(rootfs, cwd)?;
    if resolved.starts_with("/proc") {
        return Err(SpecError::WorkingDirInProc {
            path: cwd.to_path_buf(),
        });
    }
    let host = host_path(rootfs, &resolved);
    match fs::symlink_metadata(&host) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(SpecError::WorkingDirNotDirectory {
            path: cwd.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&host)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOTDIR) | Some(libc::EEXIST) => SpecError::WorkingDirNotDirectory {
                    path: cwd.to_path_buf(),
                },
                _ => io_err(&host)(e),
            }),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            Err(SpecError::WorkingDirNotDirectory {
                path: cwd.to_path_buf(),
            })
        }
        Err(e) => Err(io_err(host)(e)),
    }
}

/// Writes `spec` to `<bundle>/config.json`.
pub fn write_config(bundle: &Path, spec: &Spec) -> Result<(), SpecError> {
    let path = bundle.join("config.json");
    let json = serde_json::to_vec_pretty(spec).map_err(|e| io_err(&path)(e.into()))?;
    fs::write(&path, json).map_err(io_err(path))
}
