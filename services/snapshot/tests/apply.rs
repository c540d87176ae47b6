//! Layer apply and overlay mounts on real images: each image's layers are
//! applied one snapshot directory each (a chain, lowers top-most first), the
//! chain is mounted with overlayfs under an empty container upper, and the
//! merged tree is compared with the image's expected rootfs or with the
//! behaviour a failure case requires. Needs root (mounts, owners, devices).

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_snapshot::apply::{apply_layer, compression_for, init_upper, ApplyError, Compression};
use berth_snapshot::overlay::{mount, overlay_mount, unmount};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// One layer as the image's manifest lists it.
struct Layer {
    media_type: String,
    digest: String,
    blob: Vec<u8>,
}

/// An image read from an OCI layout archive: its layers and the config's
/// diff IDs.
struct Image {
    layers: Vec<Layer>,
    diff_ids: Vec<String>,
}

/// Reads the image tagged `tag` from an OCI layout archive
/// (index.json -> manifest -> config and layer blobs).
fn load_image(archive: &Path, tag: &str) -> Image {
    let mut files = HashMap::new();
    let mut outer = tar::Archive::new(File::open(archive).unwrap());
    for entry in outer.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let name = entry
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(name, data);
        }
    }
    let blob = |digest: &serde_json::Value| -> Vec<u8> {
        let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
        files[&format!("blobs/sha256/{hex}")].clone()
    };
    let json = |bytes: &[u8]| -> serde_json::Value { serde_json::from_slice(bytes).unwrap() };

    let index = json(&files["index.json"]);
    let descriptor = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", archive.display()));
    let manifest = json(&blob(&descriptor["digest"]));
    let config = json(&blob(&manifest["config"]["digest"]));
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| Layer {
            media_type: layer["mediaType"].as_str().unwrap().to_string(),
            digest: layer["digest"].as_str().unwrap().to_string(),
            blob: blob(&layer["digest"]),
        })
        .collect();
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    Image { layers, diff_ids }
}

/// Applies every layer into `root/<n>/fs`, each over the ones before it, and
/// checks the digests and sizes apply_layer measured. Returns the layer
/// directories, bottom first.
fn unpack(image: &Image, root: &Path) -> Result<Vec<PathBuf>, ApplyError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (n, layer) in image.layers.iter().enumerate() {
        let dir = root.join(format!("{n}/fs"));
        fs::create_dir_all(&dir).unwrap();
        let lowers: Vec<PathBuf> = dirs.iter().rev().cloned().collect();
        let compression = compression_for(&layer.media_type)?;
        let applied = apply_layer(layer.blob.as_slice(), compression, &dir, &lowers)?;
        assert_eq!(applied.compressed_digest, layer.digest);
        assert_eq!(applied.compressed_size, layer.blob.len() as u64);
        assert_eq!(applied.diff_id, image.diff_ids[n], "diff id of layer {n}");
        dirs.push(dir);
    }
    Ok(dirs)
}

/// An overlay mount that is detached when dropped.
struct Mounted {
    target: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        unmount(&self.target).unwrap();
    }
}

/// Mounts the layers as a container's rootfs: overlay of the layers under a
/// fresh upper, at `root/rootfs`.
fn mount_rootfs(layers: &[PathBuf], root: &Path) -> Mounted {
    let lowers: Vec<PathBuf> = layers.iter().rev().cloned().collect();
    let (upper, work, target) = (
        root.join("rw/fs"),
        root.join("rw/work"),
        root.join("rootfs"),
    );
    for dir in [&upper, &work, &target] {
        fs::create_dir_all(dir).unwrap();
    }
    init_upper(&upper, &lowers).unwrap();
    let spec = overlay_mount(&upper, &work, &lowers, false);
    mount(&spec, &target).unwrap();
    Mounted { target }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("berth-apply-")
        .tempdir()
        .unwrap()
}

// ---------------------------------------------------------------------------
// The tree manifest, in the format of tests/fixtures/images/tree-manifest.sh.

fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: the buffers are valid for their lengths, the path NUL-terminated.
    let len = unsafe { libc::llistxattr(cpath.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(len >= 0, "llistxattr {}", path.display());
    names.truncate(len as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name == b"security.selinux" {
            continue;
        }
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(len >= 0, "lgetxattr {}", path.display());
        value.truncate(len as usize);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// `getfattr -e text` quoting: printable ASCII as is, the rest in octal.
fn quote_xattr(value: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in value {
        match b {
            b'"' | b'\\' => out.push_str(&format!("\\{}", b as char)),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03o}")),
        }
    }
    out.push('"');
    out
}

fn walk(root: &Path, rel: &[u8], out: &mut Vec<Vec<u8>>) {
    let dir = root.join(OsStr::from_bytes(rel));
    for entry in fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let mut child = rel.to_vec();
        if !child.is_empty() {
            child.push(b'/');
        }
        child.extend_from_slice(entry.file_name().as_bytes());
        let is_dir = entry.file_type().unwrap().is_dir();
        out.push(child.clone());
        if is_dir {
            walk(root, &child, out);
        }
    }
}

/// Describes every path under `root`, one tab-separated line each: path,
/// type, mode, uid, gid, size, content (sha256, link target or major:minor),
/// nlink, hardlink-of and xattrs. Every column of tree-manifest.sh is kept.
fn tree_manifest(root: &Path) -> String {
    let mut paths = vec![Vec::new()];
    walk(root, &[], &mut paths);
    paths.sort();

    let mut first_of_inode: HashMap<(u64, u64), String> = HashMap::new();
    let mut out =
        String::from("#path\ttype\tmode\tuid\tgid\tsize\tcontent\tnlink\thardlink-of\txattrs\n");
    for rel in paths {
        let full = root.join(OsStr::from_bytes(&rel));
        let md = fs::symlink_metadata(&full).unwrap();
        let path = format!("/{}", String::from_utf8_lossy(&rel));
        let ft = md.file_type();
        let (mut size, mut content, mut nlink, mut link_of) = (
            "-".to_string(),
            "-".to_string(),
            "-".to_string(),
            "-".to_string(),
        );
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            size = md.len().to_string();
            content = hex::encode(Sha256::digest(fs::read(&full).unwrap()));
            nlink = md.nlink().to_string();
            if md.nlink() > 1 {
                match first_of_inode.get(&(md.dev(), md.ino())) {
                    Some(first) => link_of = first.clone(),
                    None => {
                        first_of_inode.insert((md.dev(), md.ino()), path.clone());
                    }
                }
            }
            "file"
        } else if ft.is_symlink() {
            content = String::from_utf8_lossy(fs::read_link(&full).unwrap().as_os_str().as_bytes())
                .into_owned();
            "symlink"
        } else if ft.is_char_device() || ft.is_block_device() {
            content = format!("{}:{}", libc::major(md.rdev()), libc::minor(md.rdev()));
            if ft.is_char_device() {
                "char"
            } else {
                "block"
            }
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let xattrs: Vec<String> = xattrs(&full)
            .iter()
            .map(|(name, value)| {
                format!("{}={}", String::from_utf8_lossy(name), quote_xattr(value))
            })
            .collect();
        let xattrs = if xattrs.is_empty() {
            "-".to_string()
        } else {
            xattrs.join(",")
        };
        out.push_str(&format!(
            "{path}\t{kind}\t{:04o}\t{}\t{}\t{size}\t{content}\t{nlink}\t{link_of}\t{xattrs}\n",
            md.mode() & 0o7777,
            md.uid(),
            md.gid()
        ));
    }
    out
}

fn assert_tree(root: &Path, expected: &Path) {
    let got = tree_manifest(root);
    let want = fs::read_to_string(expected).unwrap();
    if got != want {
        let (got_lines, want_lines): (Vec<_>, Vec<_>) =
            (got.lines().collect(), want.lines().collect());
        let missing: Vec<_> = want_lines
            .iter()
            .filter(|l| !got_lines.contains(l))
            .collect();
        let extra: Vec<_> = got_lines
            .iter()
            .filter(|l| !want_lines.contains(l))
            .collect();
        panic!(
            "tree differs from {}\nmissing: {missing:#?}\nextra: {extra:#?}",
            expected.display()
        );
    }
}

/// Unpacks an image archive and compares its mounted rootfs with the
/// expected tree.
fn check_image(archive: &str, expected: &str) {
    let image = load_image(&fixtures().join("images").join(archive), "latest");
    let root = tempdir();
    let layers = unpack(&image, root.path()).unwrap();
    let mounted = mount_rootfs(&layers, root.path());
    assert_tree(&mounted.target, &fixtures().join("images").join(expected));
}

// ---------------------------------------------------------------------------
// Real images.

/// The one-layer busybox image (gzip) gives exactly the expected rootfs.
#[test]
fn busybox_gzip_rootfs_matches() {
    check_image("busybox/busybox.oci.tar", "busybox/busybox.expected.txt");
}

/// The same layer recompressed with zstd gives the same rootfs and diff ID.
#[test]
fn busybox_zstd_rootfs_matches() {
    let image = load_image(
        &fixtures().join("images/busybox/busybox-zstd.oci.tar"),
        "latest",
    );
    assert_eq!(
        compression_for(&image.layers[0].media_type).unwrap(),
        Compression::Zstd
    );
    check_image(
        "busybox/busybox-zstd.oci.tar",
        "busybox/busybox.expected.txt",
    );
}

/// Six layers (whiteouts, an opaque marker before its directory, layers
/// without end-of-archive blocks, hardlinks, modes, owners, xattrs, odd
/// names) give exactly the expected rootfs.
#[test]
fn layers_rootfs_matches() {
    check_image("layers/layers.oci.tar", "layers/layers.expected.txt");
}

/// The other common opaque encoding (marker after the directory) gives exactly the
/// expected rootfs.
#[test]
fn opaque_rootfs_matches() {
    check_image("opaque/opaque.oci.tar", "opaque/opaque.expected.txt");
}

/// A read-only view of several layers is an overlay of the lowers alone and
/// shows the same tree.
#[test]
fn readonly_view_of_layers_matches() {
    let image = load_image(&fixtures().join("images/layers/layers.oci.tar"), "latest");
    let root = tempdir();
    let layers = unpack(&image, root.path()).unwrap();
    let lowers: Vec<PathBuf> = layers.iter().rev().cloned().collect();
    let target = root.path().join("view");
    fs::create_dir_all(&target).unwrap();
    let spec = overlay_mount(
        &root.path().join("unused"),
        &root.path().join("unused"),
        &lowers,
        true,
    );
    assert!(spec.options.contains(&"ro".to_string()));
    mount(&spec, &target).unwrap();
    let mounted = Mounted { target };
    assert_tree(
        &mounted.target,
        &fixtures().join("images/layers/layers.expected.txt"),
    );
    assert!(
        fs::write(mounted.target.join("new"), b"x").is_err(),
        "view must be read-only"
    );
}

// ---------------------------------------------------------------------------
// Failure cases.

fn case(name: &str) -> PathBuf {
    let cases = fixtures().join("cases");
    let dir = fs::read_dir(&cases)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(name))
        .unwrap();
    dir.join("image.tar")
}

fn has_opaque_xattr(dir: &Path) -> bool {
    xattrs(dir)
        .iter()
        .any(|(name, value)| name == b"trusted.overlay.opaque" && value == b"y")
}

/// C01: an opaque marker works before and after the layer's own entries in
/// the directory, and keeps those entries.
#[test]
fn c01_opaque_marker_in_any_order() {
    let image = load_image(&case("C01"), "latest");
    let root = tempdir();
    let layers = unpack(&image, root.path()).unwrap();
    let mounted = mount_rootfs(&layers, root.path());
    let r = &mounted.target;

    for (path, content) in [
        ("d/new.txt", "new\n"),
        ("d/newsub/x", "x\n"),
        ("e/new.txt", "new\n"),
        ("keep.txt", "keep\n"),
    ] {
        assert_eq!(fs::read_to_string(r.join(path)).unwrap(), content, "{path}");
    }
    for path in ["d/old.txt", "d/sub", "e/old.txt"] {
        assert!(
            fs::symlink_metadata(r.join(path)).is_err(),
            "{path} must be gone"
        );
    }
    assert!(r.join("d").is_dir() && r.join("e").is_dir());
    let tree = tree_manifest(r);
    assert!(
        !tree.contains("/.wh."),
        "whiteout names in the merged view:\n{tree}"
    );

    // The layer's own upper holds the opaque directories with their new files.
    for dir in ["d", "e"] {
        assert!(
            has_opaque_xattr(&layers[1].join(dir)),
            "{dir} must be opaque"
        );
        assert!(layers[1].join(dir).join("new.txt").is_file());
        assert!(fs::symlink_metadata(layers[1].join(dir).join(".wh..wh..opq")).is_err());
    }
}

/// C03: hardlinks replace lower files, absolute link names stay in the
/// image, links to lower files become copies, and same-layer links are real.
#[test]
fn c03_hardlinks_within_and_across_layers() {
    let image = load_image(&case("C03"), "latest");
    let root = tempdir();
    let layers = unpack(&image, root.path()).unwrap();
    let mounted = mount_rootfs(&layers, root.path());
    let r = &mounted.target;

    for path in ["usr/bin/perl", "usr/bin/perl5.38", "usr/bin/perlbug"] {
        assert_eq!(
            fs::read_to_string(r.join(path)).unwrap(),
            "PERL-v1\n",
            "{path}"
        );
    }
    assert_eq!(
        fs::read_to_string(r.join("usr/bin/doclink")).unwrap(),
        "doc\n"
    );
    assert_eq!(
        fs::read_to_string(r.join("usr/bin/fresh2")).unwrap(),
        "fresh\n"
    );

    // Same-layer links share an inode; links to a lower file share the one
    // copy made in the upper layer, and the lower file is not linked.
    let upper = &layers[1];
    let ino = |p: &str| fs::metadata(upper.join(p)).unwrap().ino();
    assert_eq!(ino("usr/bin/fresh"), ino("usr/bin/fresh2"));
    assert_eq!(ino("usr/bin/perl5.38"), ino("usr/bin/perlbug"));
    assert_eq!(
        fs::metadata(layers[0].join("usr/bin/perl"))
            .unwrap()
            .nlink(),
        1
    );
    assert_eq!(
        fs::metadata(upper.join("usr/bin/perl5.38"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );

    let bad = load_image(&case("C03"), "forward-ref");
    let err = unpack(&bad, tempdir().path()).unwrap_err();
    assert!(
        matches!(err, ApplyError::LinkTargetNotFound { .. }),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
}

/// C04: a path changing type replaces what was there, and nothing is
/// written through a replaced symlink; an entry below a lower file is refused.
#[test]
fn c04_type_changes_across_layers() {
    let image = load_image(&case("C04"), "latest");
    let root = tempdir();
    let layers = unpack(&image, root.path()).unwrap();
    let mounted = mount_rootfs(&layers, root.path());
    let r = &mounted.target;

    assert_eq!(
        fs::read_to_string(r.join("etc/conf.d")).unwrap(),
        "now a file\n"
    );
    assert!(r.join("lib").is_dir());
    assert_eq!(fs::read_to_string(r.join("lib/libx.so")).unwrap(), "x\n");
    let app = fs::symlink_metadata(r.join("opt/app")).unwrap();
    assert!(app.is_dir(), "opt/app must be a real directory");
    let names: Vec<_> = fs::read_dir(r.join("opt/app"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["new"]);
    assert!(r.join("opt/app-1.0/bin").is_file());
    assert!(!r.join("opt/app-1.0/new").exists());
    assert_eq!(
        fs::read_link(r.join("sbin")).unwrap(),
        Path::new("usr/sbin")
    );
    assert_eq!(
        fs::read_to_string(r.join("usr/sbin/tool")).unwrap(),
        "tool\n"
    );

    let bad = load_image(&case("C04"), "nondir-parent");
    let err = unpack(&bad, tempdir().path()).unwrap_err();
    assert!(matches!(err, ApplyError::NotADirectory { .. }), "{err:?}");
}

/// C05: owners (large ids too), set-id and sticky bits, capabilities and
/// other xattrs, devices, fifos, mtimes and symlink owners survive.
#[test]
fn c05_metadata_fidelity() {
    let image = load_image(&case("C05"), "latest");
    let root = tempdir();
    let layers = unpack(&image, root.path()).unwrap();
    let mounted = mount_rootfs(&layers, root.path());
    let r = &mounted.target;
    let md = |p: &str| fs::symlink_metadata(r.join(p)).unwrap();
    let owner_mode = |p: &str| (md(p).mode() & 0o7777, md(p).uid(), md(p).gid());

    assert_eq!(owner_mode("usr/bin/su"), (0o4755, 0, 0));
    assert_eq!(owner_mode("home/user1"), (0o700, 1000, 1000));
    assert_eq!(owner_mode("home/user1/data"), (0o640, 1000, 1000));
    assert_eq!(
        (md("srv/big-uid").uid(), md("srv/big-uid").gid()),
        (3_000_000, 3_000_000)
    );
    assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(
        (
            md("var/spool/mail").mode() & 0o7777,
            md("var/spool/mail").gid()
        ),
        (0o2775, 8)
    );

    let null = md("dev/null-copy");
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (
            libc::major(null.rdev()),
            libc::minor(null.rdev()),
            null.mode() & 0o7777
        ),
        (1, 3, 0o666)
    );
    let lo = md("dev/loop-copy");
    assert!(lo.file_type().is_block_device());
    assert_eq!(
        (
            libc::major(lo.rdev()),
            libc::minor(lo.rdev()),
            lo.mode() & 0o7777,
            lo.gid()
        ),
        (7, 0, 0o660, 6)
    );
    assert!(md("run/fifo").file_type().is_fifo());
    assert_eq!(md("run/fifo").mode() & 0o7777, 0o600);
    assert_eq!(md("old-mtime").mtime(), 86400);
    assert_eq!((md("rel-link").uid(), md("rel-link").gid()), (1000, 1000));
    assert_eq!((md("usr/bin/ping").uid(), md("usr/bin/ping").gid()), (0, 0));

    let cap = hex::decode("0100000200200000000000000000000000000000").unwrap();
    let ping = xattrs(&r.join("usr/bin/ping"));
    assert!(
        ping.contains(&(b"security.capability".to_vec(), cap)),
        "{ping:?}"
    );
    let data = xattrs(&r.join("home/user1/data"));
    assert!(
        data.contains(&(b"user.comment".to_vec(), b"hello".to_vec())),
        "{data:?}"
    );
}

/// C06: `..` and absolute names stay inside the root, hardlinks to outside
/// names link the file inside the image or fail, and the host is untouched.
#[test]
fn c06_names_and_hardlinks_stay_inside_the_root() {
    let secret = Path::new("/tmp/c06-host-secret");
    let host_only = Path::new("/tmp/c06-host-only");
    let escapes = [
        "/tmp/c06-escape-dotdot",
        "/tmp/c06-escape-abs",
        "/tmp/c06-escape-mid",
    ];
    for path in escapes {
        let _ = fs::remove_file(path);
    }
    fs::write(secret, "HOST-SECRET\n").unwrap();
    fs::write(host_only, "HOST-ONLY\n").unwrap();
    let secret_ino = fs::metadata(secret).unwrap().ino();
    let host_only_ino = fs::metadata(host_only).unwrap().ino();

    // names: scoped into the root.
    let root = tempdir();
    let layers = unpack(&load_image(&case("C06"), "names"), root.path()).unwrap();
    for path in escapes {
        assert!(
            fs::symlink_metadata(path).is_err(),
            "{path} escaped to the host"
        );
        let inside = layers[0].join(path.trim_start_matches('/'));
        assert_eq!(
            fs::read_to_string(&inside).unwrap(),
            "ESCAPED\n",
            "{}",
            inside.display()
        );
    }
    assert_eq!(
        fs::read_to_string(layers[0].join("ok/inside")).unwrap(),
        "inside\n"
    );
    assert_eq!(
        fs::read_to_string(layers[0].join("ok/normal")).unwrap(),
        "normal\n"
    );

    // hardlink: both links are the image's own /tmp/c06-host-secret.
    let root = tempdir();
    let layers = unpack(&load_image(&case("C06"), "hardlink"), root.path()).unwrap();
    let inside_ino = fs::metadata(layers[0].join("tmp/c06-host-secret"))
        .unwrap()
        .ino();
    for name in ["stolen-rel", "stolen-abs"] {
        let link = layers[0].join(name);
        assert_eq!(
            fs::read_to_string(&link).unwrap(),
            "inside-rootfs\n",
            "{name}"
        );
        let ino = fs::metadata(&link).unwrap().ino();
        assert_ne!(ino, secret_ino, "{name} links the host file");
        assert_eq!(ino, inside_ino, "{name}");
    }

    // hardlink-missing: refused, nothing taken from the host.
    let root = tempdir();
    let err = unpack(&load_image(&case("C06"), "hardlink-missing"), root.path()).unwrap_err();
    assert!(
        matches!(err, ApplyError::LinkTargetNotFound { .. }),
        "{err:?}"
    );
    let leaked = tree_manifest(root.path());
    assert!(!leaked.contains("stolen"), "{leaked}");

    assert_eq!(fs::read_to_string(secret).unwrap(), "HOST-SECRET\n");
    assert_eq!(fs::metadata(secret).unwrap().nlink(), 1);
    assert_eq!(fs::metadata(host_only).unwrap().ino(), host_only_ino);
    assert_eq!(fs::metadata(host_only).unwrap().nlink(), 1);
    for path in escapes {
        assert!(
            fs::symlink_metadata(path).is_err(),
            "{path} escaped to the host"
        );
    }
    fs::remove_file(secret).unwrap();
    fs::remove_file(host_only).unwrap();
}

// ---------------------------------------------------------------------------
// Deep chains.

fn plain_layer(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_704_067_200);
        header.set_cksum();
        builder
            .append_data(&mut header, name, content.as_bytes())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

/// A 60-layer chain under long paths needs a lowerdir longer than a page; it
/// mounts (through the forked helper) and shows every layer.
#[test]
fn sixty_layer_chain_mounts() {
    let root = tempdir();
    let base = root
        .path()
        .join("a-long-snapshot-root-directory-name-as-a-deployment-might-have/snapshots");
    let mut dirs: Vec<PathBuf> = Vec::new();
    for n in 0..60 {
        let dir = base.join(format!("{n}/fs"));
        fs::create_dir_all(&dir).unwrap();
        let lowers: Vec<PathBuf> = dirs.iter().rev().cloned().collect();
        let own = format!("layer-{n:02}.txt");
        let top = format!("{n}\n");
        let layer = plain_layer(&[(own.as_str(), "x\n"), ("top.txt", top.as_str())]);
        apply_layer(layer.as_slice(), Compression::None, &dir, &lowers).unwrap();
        dirs.push(dir);
    }

    let lowers: Vec<PathBuf> = dirs.iter().rev().cloned().collect();
    let (upper, work, target) = (
        base.join("rw/fs"),
        base.join("rw/work"),
        root.path().join("rootfs"),
    );
    for dir in [&upper, &work, &target] {
        fs::create_dir_all(dir).unwrap();
    }
    let spec = overlay_mount(&upper, &work, &lowers, false);
    assert!(
        spec.options.join(",").len() > 4096,
        "the test must exceed one page"
    );
    mount(&spec, &target).unwrap();
    let mounted = Mounted { target };

    for n in 0..60 {
        assert!(
            mounted.target.join(format!("layer-{n:02}.txt")).is_file(),
            "layer {n}"
        );
    }
    assert_eq!(
        fs::read_to_string(mounted.target.join("top.txt")).unwrap(),
        "59\n"
    );
    fs::write(mounted.target.join("written"), b"rw").unwrap();
    assert!(upper.join("written").is_file());
}
