//! Unit tests of the spec builder; the C15 case's rules run against its real
//! image configs.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::*;

/// The C15 case's image archive: one tag per image-config variant.
const C15: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/cases/C15-process-args-env-cwd/image.tar"
);

/// The C15 archive unpacked once: (layout dir, rootfs of its one layer).
fn c15() -> &'static (tempfile::TempDir, PathBuf) {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        tar(&["-xf", C15, "-C"], dir.path());
        let manifest = manifest_of(dir.path(), "wd-unset");
        let layer = manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir(&rootfs).unwrap();
        let blob = blob_path(dir.path(), &layer);
        tar(&["-xzf", blob.to_str().unwrap(), "-C"], &rootfs);
        (dir, rootfs)
    })
}

fn tar(args: &[&str], dir: &Path) {
    let status = Command::new("tar").args(args).arg(dir).status().unwrap();
    assert!(status.success());
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(&digest["sha256:".len()..])
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn manifest_of(layout: &Path, tag: &str) -> serde_json::Value {
    let index = read_json(&layout.join("index.json"));
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in the C15 image"));
    read_json(&blob_path(layout, entry["digest"].as_str().unwrap()))
}

/// The image config of one C15 tag, parsed as the task service would.
fn c15_config(tag: &str) -> ImageConfig {
    let (dir, _) = c15();
    let manifest = manifest_of(dir.path(), tag);
    let config = read_json(&blob_path(
        dir.path(),
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    serde_json::from_value(config["config"].clone()).unwrap()
}

/// A throwaway rootfs copy of the C15 layer, for tests that write to it.
fn c15_rootfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", c15().1.display()))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

fn spec_for(tag: &str, opts: &RunOptions) -> Result<Spec, SpecError> {
    build_spec("ns", "c1", &c15().1, &c15_config(tag), opts)
}

fn args_of(spec: &Spec) -> Vec<String> {
    spec.process().as_ref().unwrap().args().clone().unwrap()
}

fn env_of(spec: &Spec) -> Vec<String> {
    spec.process().as_ref().unwrap().env().clone().unwrap()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn default_path() -> String {
    format!("PATH={DEFAULT_PATH}")
}

#[test]
fn c15_entrypoint_and_cmd_are_joined() {
    let spec = spec_for("ep-and-cmd", &RunOptions::default()).unwrap();
    assert_eq!(
        args_of(&spec),
        strings(&["/bin/probe", "report", "c1", "c2"])
    );
}

#[test]
fn c15_user_args_replace_cmd_and_keep_entrypoint() {
    let opts = RunOptions {
        args: strings(&["u1"]),
        ..RunOptions::default()
    };
    let spec = spec_for("ep-and-cmd", &opts).unwrap();
    assert_eq!(args_of(&spec), strings(&["/bin/probe", "report", "u1"]));
}

#[test]
fn c15_entrypoint_override_drops_image_cmd() {
    let opts = RunOptions {
        entrypoint: Some(strings(&["/bin/probe"])),
        ..RunOptions::default()
    };
    let spec = spec_for("ep-and-cmd", &opts).unwrap();
    assert_eq!(args_of(&spec), strings(&["/bin/probe"]));

    let with_args = RunOptions {
        args: strings(&["a"]),
        ..opts
    };
    let spec = spec_for("ep-and-cmd", &with_args).unwrap();
    assert_eq!(args_of(&spec), strings(&["/bin/probe", "a"]));
}

#[test]
fn c15_cmd_only_and_its_replacement() {
    let spec = spec_for("cmd-only", &RunOptions::default()).unwrap();
    assert_eq!(
        args_of(&spec),
        strings(&["/bin/probe", "report", "from-cmd"])
    );
    let opts = RunOptions {
        args: strings(&["/bin/other", "x"]),
        ..RunOptions::default()
    };
    let spec = spec_for("cmd-only", &opts).unwrap();
    assert_eq!(args_of(&spec), strings(&["/bin/other", "x"]));
}

#[test]
fn c15_entrypoint_only() {
    let spec = spec_for("ep-only", &RunOptions::default()).unwrap();
    assert_eq!(args_of(&spec), strings(&["/bin/probe", "report"]));
}

#[test]
fn c15_no_command_is_an_error_not_sh() {
    for tag in ["neither", "empty-arrays"] {
        let err = spec_for(tag, &RunOptions::default()).unwrap_err();
        assert!(matches!(err, SpecError::NoCommand { .. }), "{tag}: {err}");
        assert!(err.to_string().contains("no command specified"));
    }
}

#[test]
fn c15_default_path_when_env_absent() {
    let spec = spec_for("env-absent", &RunOptions::default()).unwrap();
    assert!(env_of(&spec).contains(&default_path()));
}

#[test]
fn c15_default_path_added_beside_other_env() {
    let env = env_of(&spec_for("env-without-path", &RunOptions::default()).unwrap());
    assert!(env.contains(&"FOO=bar".to_string()));
    assert!(env.contains(&default_path()));
}

#[test]
fn c15_duplicate_env_keeps_last_value_once() {
    let env = env_of(&spec_for("env-dup", &RunOptions::default()).unwrap());
    let a: Vec<_> = env.iter().filter(|e| e.starts_with("A=")).collect();
    assert_eq!(a, ["A=2"]);
    assert!(env.contains(&"EMPTY=".to_string()));
    assert!(env.contains(&"WITH=equals=inside".to_string()));
    assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
}

#[test]
fn c15_env_without_equals_or_name_is_rejected() {
    for (tag, entry) in [("env-noequals", "NOEQUALS"), ("env-empty-name", "=value")] {
        match spec_for(tag, &RunOptions::default()) {
            Err(SpecError::InvalidEnv { entry: bad, .. }) => assert_eq!(bad, entry),
            other => panic!("{tag}: {other:?}"),
        }
    }
}

#[test]
fn c15_user_env_overrides_and_unsets() {
    let opts = RunOptions {
        env: strings(&["A=user", "EMPTY", "NEW=1"]),
        ..RunOptions::default()
    };
    let env = env_of(&spec_for("env-dup", &opts).unwrap());
    assert!(env.contains(&"A=user".to_string()));
    assert!(!env.iter().any(|e| e.starts_with("A=") && e != "A=user"));
    assert!(!env.iter().any(|e| e.starts_with("EMPTY=")));
    assert!(env.contains(&"NEW=1".to_string()));
}

#[test]
fn c15_ignored_fields_change_nothing_but_the_stop_signal() {
    let plain = spec_for("wd-unset", &RunOptions::default()).unwrap();
    let mut fancy = spec_for("ignored-fields", &RunOptions::default()).unwrap();
    assert_eq!(stop_signal(&fancy), libc::SIGQUIT);
    assert_eq!(stop_signal(&plain), libc::SIGTERM);
    let annotations = fancy.annotations_mut().as_mut().unwrap();
    assert_eq!(
        annotations.remove(STOP_SIGNAL_ANNOTATION).as_deref(),
        Some("SIGQUIT")
    );
    assert_eq!(fancy, plain);
}

#[test]
fn c15_unset_working_dir_is_root() {
    let spec = spec_for("wd-unset", &RunOptions::default()).unwrap();
    assert_eq!(spec.process().as_ref().unwrap().cwd(), Path::new("/"));
}

#[test]
fn c15_missing_working_dir_is_created() {
    let rootfs = c15_rootfs();
    let bundle = tempfile::tempdir().unwrap();
    let image = c15_config("wd-missing");
    let mut spec = build_spec("ns", "c1", rootfs.path(), &image, &RunOptions::default()).unwrap();
    let cwd = spec.process().as_ref().unwrap().cwd().clone();
    assert_eq!(cwd, Path::new("/does/not/exist"));

    prepare_rootfs(bundle.path(), rootfs.path(), &mut spec).unwrap();
    let created = fs::metadata(rootfs.path().join("does/not/exist")).unwrap();
    assert!(created.is_dir());
    assert_eq!(created.permissions().mode() & 0o777, 0o755);
}

#[test]
fn c15_working_dir_that_is_a_file_is_refused() {
    let rootfs = c15_rootfs();
    let bundle = tempfile::tempdir().unwrap();
    let image = c15_config("wd-is-file");
    let mut spec = build_spec("ns", "c1", rootfs.path(), &image, &RunOptions::default()).unwrap();
    let err = prepare_rootfs(bundle.path(), rootfs.path(), &mut spec).unwrap_err();
    assert!(
        matches!(err, SpecError::WorkingDirNotDirectory { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not a directory"));
}

#[test]
fn image_config_reads_nulls_as_empty() {
    let config: ImageConfig =
        serde_json::from_str(r#"{"Cmd":null,"Entrypoint":null,"Env":null,"User":""}"#).unwrap();
    assert_eq!(config, ImageConfig::default());
}

#[test]
fn relative_working_dir_is_rejected() {
    let opts = RunOptions {
        working_dir: Some("srv".into()),
        ..RunOptions::default()
    };
    let err = spec_for("cmd-only", &opts).unwrap_err();
    assert!(matches!(err, SpecError::RelativeWorkingDir { .. }));
}

#[test]
fn working_dir_override_wins() {
    let opts = RunOptions {
        working_dir: Some("/srv".into()),
        ..RunOptions::default()
    };
    let spec = spec_for("wd-missing", &opts).unwrap();
    assert_eq!(spec.process().as_ref().unwrap().cwd(), Path::new("/srv"));
}

/// A rootfs with hand-written users: the only way to cover groups,
/// members and names that a real image fixture lacks.
fn users_rootfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("etc")).unwrap();
    fs::write(
        dir.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("etc/group"),
        "root:x:0:\nwheel:x:10:app,other\napp:x:1000:\nstaff:x:50:\n",
    )
    .unwrap();
    dir
}

#[test]
fn user_forms_resolve() {
    let root = users_rootfs();
    let resolve = |u: &str| resolve_user(root.path(), u);
    let user = |uid, gid, extra: &[u32], home: Option<&str>| ResolvedUser {
        uid,
        gid,
        additional_gids: extra.to_vec(),
        home: home.map(str::to_string),
    };
    let cases = [
        ("", user(0, 0, &[], Some("/root"))),
        ("app", user(1000, 1000, &[10], Some("/home/app"))),
        ("1000", user(1000, 1000, &[10], Some("/home/app"))),
        ("1000:50", user(1000, 50, &[10], Some("/home/app"))),
        ("app:staff", user(1000, 50, &[10], Some("/home/app"))),
        ("app:wheel", user(1000, 10, &[], Some("/home/app"))),
        ("4242", user(4242, 0, &[], None)),
        ("4242:7", user(4242, 7, &[], None)),
    ];
    for (input, want) in cases {
        assert_eq!(resolve(input).unwrap(), want, "user {input:?}");
    }
}

#[test]
fn unknown_user_and_group_names_are_errors() {
    let root = users_rootfs();
    let err = resolve_user(root.path(), "ghost").unwrap_err();
    assert!(matches!(err, SpecError::UserNotFound { .. }));
    assert_eq!(
        err.to_string(),
        "user \"ghost\" not found in /etc/passwd of the image"
    );
    let err = resolve_user(root.path(), "app:ghosts").unwrap_err();
    assert!(matches!(err, SpecError::GroupNotFound { .. }));
    let err = resolve_user(root.path(), "app:").unwrap_err();
    assert!(matches!(err, SpecError::InvalidUser { .. }));
    let empty = tempfile::tempdir().unwrap();
    let err = resolve_user(empty.path(), "app").unwrap_err();
    assert!(matches!(err, SpecError::UserNotFound { .. }));
}

#[test]
fn user_lands_in_process_with_home() {
    let root = users_rootfs();
    let image = ImageConfig {
        cmd: strings(&["true"]),
        user: "app".into(),
        ..ImageConfig::default()
    };
    let spec = build_spec("ns", "c1", root.path(), &image, &RunOptions::default()).unwrap();
    let process = spec.process().as_ref().unwrap();
    assert_eq!(process.user().uid(), 1000);
    assert_eq!(process.user().gid(), 1000);
    assert_eq!(process.user().additional_gids().as_deref(), Some(&[10][..]));
    assert!(process
        .env()
        .as_ref()
        .unwrap()
        .contains(&"HOME=/home/app".into()));

    let opts = RunOptions {
        user: Some("0".into()),
        ..RunOptions::default()
    };
    let spec = build_spec("ns", "c1", root.path(), &image, &opts).unwrap();
    assert_eq!(spec.process().as_ref().unwrap().user().uid(), 0);
}

#[test]
fn defaults_match_docker() {
    let spec = spec_for("cmd-only", &RunOptions::default()).unwrap();
    let process = spec.process().as_ref().unwrap();
    assert_eq!(process.terminal(), Some(false));
    assert!(!process
        .env()
        .as_ref()
        .unwrap()
        .iter()
        .any(|e| e.starts_with("TERM=")));
    let caps = process.capabilities().as_ref().unwrap();
    let want: Capabilities = default_capabilities().into_iter().collect();
    assert_eq!(caps.bounding().as_ref(), Some(&want));
    assert_eq!(caps.effective().as_ref(), Some(&want));
    assert_eq!(caps.permitted().as_ref(), Some(&want));
    assert!(!want.contains(&Capability::SysAdmin));

    let root = spec.root().as_ref().unwrap();
    assert_eq!(root.path(), Path::new("rootfs"));
    assert_eq!(root.readonly(), Some(false));
    assert_eq!(spec.hostname().as_deref(), Some("c1"));

    let mounts: Vec<_> = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.destination().to_str().unwrap().to_string())
        .collect();
    for dest in [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
    ] {
        assert!(mounts.contains(&dest.to_string()), "{dest} not mounted");
    }
    let sys = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new("/sys"));
    assert!(sys
        .unwrap()
        .options()
        .as_ref()
        .unwrap()
        .contains(&"ro".into()));

    let linux = spec.linux().as_ref().unwrap();
    assert_eq!(
        linux.cgroups_path().as_deref(),
        Some(Path::new("berth/ns/c1"))
    );
    assert!(linux
        .masked_paths()
        .as_ref()
        .unwrap()
        .contains(&"/proc/kcore".into()));
    assert!(linux
        .readonly_paths()
        .as_ref()
        .unwrap()
        .contains(&"/proc/sys".into()));
    let kinds: Vec<_> = linux
        .namespaces()
        .as_ref()
        .unwrap()
        .iter()
        .map(|n| n.typ())
        .collect();
    assert_eq!(
        kinds,
        [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Network,
        ]
    );
}

#[test]
fn options_reach_the_spec() {
    let opts = RunOptions {
        hostname: Some("web".into()),
        host_network: true,
        readonly_rootfs: true,
        tty: true,
        ..RunOptions::default()
    };
    let spec = spec_for("cmd-only", &opts).unwrap();
    assert_eq!(spec.hostname().as_deref(), Some("web"));
    assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
    let process = spec.process().as_ref().unwrap();
    assert_eq!(process.terminal(), Some(true));
    assert!(process
        .env()
        .as_ref()
        .unwrap()
        .contains(&"TERM=xterm".into()));
    let linux = spec.linux().as_ref().unwrap();
    assert!(!linux
        .namespaces()
        .as_ref()
        .unwrap()
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Network));
}

#[test]
fn long_container_id_is_cut_to_a_hostname() {
    let id = "x".repeat(100);
    let spec = build_spec(
        "ns",
        &id,
        &c15().1,
        &c15_config("cmd-only"),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(spec.hostname().as_ref().unwrap().len(), HOST_NAME_MAX - 1);
}

#[test]
fn signals_parse_by_name_and_number() {
    assert_eq!(parse_signal("SIGQUIT").unwrap(), libc::SIGQUIT);
    assert_eq!(parse_signal("quit").unwrap(), libc::SIGQUIT);
    assert_eq!(parse_signal("9").unwrap(), libc::SIGKILL);
    assert!(parse_signal("SIGNOPE").is_err());
    let image = ImageConfig {
        cmd: strings(&["true"]),
        stop_signal: Some("SIGBOGUS".into()),
        ..ImageConfig::default()
    };
    let err = build_spec("ns", "c1", &c15().1, &image, &RunOptions::default()).unwrap_err();
    assert!(matches!(err, SpecError::InvalidSignal { .. }));
}

fn bind_sources(spec: &Spec) -> HashMap<String, PathBuf> {
    spec.mounts()
        .as_ref()
        .unwrap()
        .iter()
        .filter(|m| m.typ().as_deref() == Some("bind"))
        .map(|m| {
            let dest = m.destination().to_str().unwrap().to_string();
            (dest, m.source().clone().unwrap())
        })
        .collect()
}

#[test]
fn etc_files_are_bind_mounted_from_the_bundle() {
    let rootfs = c15_rootfs();
    let bundle = tempfile::tempdir().unwrap();
    let mut spec = build_spec(
        "ns",
        "c1",
        rootfs.path(),
        &c15_config("cmd-only"),
        &RunOptions::default(),
    )
    .unwrap();
    prepare_rootfs(bundle.path(), rootfs.path(), &mut spec).unwrap();
    prepare_rootfs(bundle.path(), rootfs.path(), &mut spec).unwrap();

    let binds = bind_sources(&spec);
    assert_eq!(binds.len(), 3, "{binds:?}");
    assert_eq!(binds["/etc/hostname"], bundle.path().join("hostname"));
    assert_eq!(
        fs::read_to_string(bundle.path().join("hostname")).unwrap(),
        "c1\n"
    );
    let hosts = fs::read_to_string(bundle.path().join("hosts")).unwrap();
    assert!(hosts.contains("localhost") && hosts.contains("c1"));
    assert!(bundle.path().join("resolv.conf").exists());
    // The image itself is untouched.
    assert!(!rootfs.path().join("etc/hostname").exists());
    assert!(!rootfs.path().join("etc/hosts").exists());
}

#[test]
fn etc_symlinks_in_the_image_are_left_alone() {
    let rootfs = c15_rootfs();
    let bundle = tempfile::tempdir().unwrap();
    symlink("/run/resolv.conf", rootfs.path().join("etc/resolv.conf")).unwrap();
    fs::create_dir(rootfs.path().join("etc/hosts")).unwrap();
    let mut spec = build_spec(
        "ns",
        "c1",
        rootfs.path(),
        &c15_config("cmd-only"),
        &RunOptions {
            readonly_rootfs: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    prepare_rootfs(bundle.path(), rootfs.path(), &mut spec).unwrap();

    let binds = bind_sources(&spec);
    assert_eq!(binds.keys().collect::<Vec<_>>(), ["/etc/hostname"]);
    let hostname = spec.mounts().as_ref().unwrap().last().unwrap();
    assert!(hostname.options().as_ref().unwrap().contains(&"ro".into()));
}

#[test]
fn working_dir_through_proc_is_refused() {
    let rootfs = c15_rootfs();
    let bundle = tempfile::tempdir().unwrap();
    symlink("../proc/self", rootfs.path().join("tmp/me")).unwrap();
    for cwd in ["/proc/self/cwd", "/tmp/me/x"] {
        let opts = RunOptions {
            working_dir: Some(cwd.into()),
            ..RunOptions::default()
        };
        let mut spec =
            build_spec("ns", "c1", rootfs.path(), &c15_config("cmd-only"), &opts).unwrap();
        let err = prepare_rootfs(bundle.path(), rootfs.path(), &mut spec).unwrap_err();
        assert!(
            matches!(err, SpecError::WorkingDirInProc { .. }),
            "{cwd}: {err}"
        );
    }
}

#[test]
fn symlinks_resolve_inside_the_rootfs() {
    let rootfs = c15_rootfs();
    let root = rootfs.path();
    symlink("/../../../../work", root.join("abs")).unwrap();
    symlink("../../../../../outside", root.join("tmp/rel")).unwrap();
    symlink("loop", root.join("loop")).unwrap();
    assert_eq!(
        resolve_in_root(root, Path::new("/abs/a")).unwrap(),
        Path::new("/work/a")
    );
    assert_eq!(
        resolve_in_root(root, Path::new("/tmp/rel")).unwrap(),
        Path::new("/outside")
    );
    let err = resolve_in_root(root, Path::new("/loop")).unwrap_err();
    assert!(matches!(err, SpecError::SymlinkLoop { .. }));

    // A working dir behind an escaping link is created inside the rootfs.
    let bundle = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        working_dir: Some("/tmp/rel/w".into()),
        ..RunOptions::default()
    };
    let mut spec = build_spec("ns", "c1", root, &c15_config("cmd-only"), &opts).unwrap();
    prepare_rootfs(bundle.path(), root, &mut spec).unwrap();
    assert!(root.join("outside/w").is_dir());
}

#[test]
fn config_json_is_written() {
    let bundle = tempfile::tempdir().unwrap();
    let spec = spec_for("cmd-only", &RunOptions::default()).unwrap();
    write_config(bundle.path(), &spec).unwrap();
    let back = Spec::load(bundle.path().join("config.json")).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn capabilities_are_added_dropped_and_privileged_takes_all() {
    let caps = |opts: &RunOptions| -> Vec<Capability> {
        let spec = spec_for("cmd-only", opts).unwrap();
        let process = spec.process().clone().unwrap();
        let mut caps: Vec<_> = process
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .clone()
            .unwrap()
            .into_iter()
            .collect();
        caps.sort_by_key(|c| c.to_string());
        caps
    };
    let defaults = caps(&RunOptions::default());
    assert!(!defaults.contains(&Capability::NetAdmin));
    let added = caps(&RunOptions {
        cap_add: vec!["net_admin".into()],
        cap_drop: vec!["CAP_CHOWN".into()],
        ..RunOptions::default()
    });
    assert!(added.contains(&Capability::NetAdmin));
    assert!(!added.contains(&Capability::Chown));
    assert_eq!(added.len(), defaults.len());
    let only_kill = caps(&RunOptions {
        cap_drop: vec!["ALL".into()],
        cap_add: vec!["KILL".into()],
        ..RunOptions::default()
    });
    assert_eq!(only_kill, [Capability::Kill]);
    let spec = spec_for("cmd-only", &RunOptions::default()).unwrap();
    let process_caps = spec
        .process()
        .clone()
        .unwrap()
        .capabilities()
        .clone()
        .unwrap();
    assert!(process_caps
        .inheritable()
        .clone()
        .unwrap_or_default()
        .is_empty());
    assert!(process_caps
        .ambient()
        .clone()
        .unwrap_or_default()
        .is_empty());
    let privileged = caps(&RunOptions {
        privileged: true,
        ..RunOptions::default()
    });
    // Privileged gets what this process may hand on, which for a root test
    // process includes CAP_SYS_ADMIN.
    assert!(privileged.contains(&Capability::SysAdmin));
    assert!(privileged.len() > defaults.len());
    let unknown = spec_for(
        "cmd-only",
        &RunOptions {
            cap_add: vec!["FLY".into()],
            ..RunOptions::default()
        },
    );
    assert!(matches!(unknown, Err(SpecError::UnknownCapability { .. })));
}

#[test]
fn privileged_drops_masks_and_allows_devices() {
    let spec = spec_for(
        "cmd-only",
        &RunOptions {
            privileged: true,
            ..RunOptions::default()
        },
    )
    .unwrap();
    let linux = spec.linux().clone().unwrap();
    assert!(linux.masked_paths().clone().unwrap_or_default().is_empty());
    assert!(linux
        .readonly_paths()
        .clone()
        .unwrap_or_default()
        .is_empty());
    let devices = linux
        .resources()
        .clone()
        .unwrap()
        .devices()
        .clone()
        .unwrap();
    assert!(devices[0].allow());
    let sys = spec
        .mounts()
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| m.destination() == Path::new("/sys"))
        .unwrap();
    assert!(!sys.options().clone().unwrap().contains(&"ro".to_string()));
}

#[test]
fn binds_tmpfs_and_limits_reach_the_spec() {
    let host = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        binds: vec![Bind {
            source: host.path().to_path_buf(),
            destination: "/data".into(),
            readonly: true,
        }],
        tmpfs: vec!["/scratch".into()],
        limits: Limits {
            memory_bytes: 32 << 20,
            cpu_millis: 1500,
            pids: 20,
        },
        ..RunOptions::default()
    };
    let spec = spec_for("cmd-only", &opts).unwrap();
    let mounts = spec.mounts().clone().unwrap();
    let data = mounts
        .iter()
        .find(|m| m.destination() == Path::new("/data"))
        .unwrap();
    assert_eq!(data.typ().as_deref(), Some("bind"));
    assert!(data.options().clone().unwrap().contains(&"ro".to_string()));
    let scratch = mounts
        .iter()
        .find(|m| m.destination() == Path::new("/scratch"))
        .unwrap();
    assert_eq!(scratch.typ().as_deref(), Some("tmpfs"));
    let resources = spec.linux().clone().unwrap().resources().clone().unwrap();
    assert_eq!(resources.memory().unwrap().limit(), Some(32 << 20));
    let cpu = resources.cpu().clone().unwrap();
    assert_eq!((cpu.quota(), cpu.period()), (Some(150_000), Some(100_000)));
    assert_eq!(resources.pids().unwrap().limit(), 20);

    let relative = RunOptions {
        tmpfs: vec!["scratch".into()],
        ..RunOptions::default()
    };
    assert!(matches!(
        spec_for("cmd-only", &relative),
        Err(SpecError::InvalidMount { .. })
    ));
    let missing = RunOptions {
        binds: vec![Bind {
            source: "/no/such/dir".into(),
            destination: "/data".into(),
            readonly: false,
        }],
        ..RunOptions::default()
    };
    assert!(matches!(
        spec_for("cmd-only", &missing),
        Err(SpecError::InvalidMount { .. })
    ));
    let negative = RunOptions {
        limits: Limits {
            memory_bytes: -1,
            ..Limits::default()
        },
        ..RunOptions::default()
    };
    assert!(matches!(
        spec_for("cmd-only", &negative),
        Err(SpecError::InvalidLimit { .. })
    ));
}
