//! Who may do what on the bus: berth's identities, their NATS permissions,
//! and the files that hold them.
//!
//! Every identity is an nkey: the server's configuration holds only public
//! keys, and each client holds its own seed in a file readable by root
//! only. An auth directory holds one seed file per identity, named for its
//! role, and the `authorization` block made from them:
//!
//! ```text
//! <dir>/admin.nk              everything (the local operator, the CLI's default)
//! <dir>/observer.nk           events, discovery and read-only operations
//! <dir>/content.nk            the content service
//! <dir>/metadata.nk           the metadata service
//! <dir>/gc.nk                 the gc service
//! <dir>/snapshot-<node>.nk    the snapshot service of one node
//! <dir>/task-<node>.nk        the task service of one node
//! <dir>/tenant-<namespace>.nk a tenant, confined to its namespace
//! <dir>/nats-auth.conf        `authorization { users = [...] }` for nats-server
//! ```
//!
//! The permissions are derived from what each service serves and calls:
//! a service subscribes to its own subjects (`berth.v1.*.<service>.>`, on
//! its node for snapshot and task), to `$SRV.>` for discovery, and to its
//! own reply inbox; it publishes exactly the operations of other services
//! it calls, its own event topics and the JetStream API calls on the event
//! stream it needs; it answers requests through `allow_responses`. A tenant
//! publishes in `berth.v1.<namespace>.>` except events and the internal
//! operations (gc's mark and run, task reservations, prunes, the cluster's
//! namespace list), subscribes to its namespace's events and its inbox, and
//! may create event consumers only with a filter inside its namespace.
//!
//! # Limitations
//!
//! JetStream consumer names are not tied to their makers: a tenant or an
//! observer that learns the name of another client's consumer could pull
//! from it or delete it (names are random and no listing is allowed). A
//! call a service starts making to another service, or an event topic
//! group it starts publishing, needs its line here: until then the server
//! refuses it and the call answers `PermissionDenied`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use berth_bus::config::{inbox_prefix_for, public_key, read_seed};
use berth_bus::events::STREAM;
use berth_bus::nodes::{BUCKET, BUCKET_STREAM};

/// The file name of the server's `authorization` block in an auth directory.
pub const AUTH_CONF: &str = "nats-auth.conf";

/// The seed file of the local operator.
pub const ADMIN_FILE: &str = "admin.nk";

/// What one identity may do.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Everything.
    Admin,
    /// Events, discovery and read-only operations in every namespace.
    Observer,
    /// The content service.
    Content,
    /// The metadata service.
    Metadata,
    /// The gc service.
    Gc,
    /// The snapshot service of a node.
    Snapshot(String),
    /// The task service of a node.
    Task(String),
    /// A tenant of one namespace.
    Tenant(String),
}

/// A user's NATS permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects the user may publish to.
    pub publish_allow: Vec<String>,
    /// Subjects under `publish_allow` it still may not publish to.
    pub publish_deny: Vec<String>,
    /// Subjects the user may subscribe to.
    pub subscribe_allow: Vec<String>,
    /// Whether it may reply to the requests it receives.
    pub allow_responses: bool,
}

impl Permissions {
    /// The same lists with each subject once, in first-seen order.
    fn deduplicated(mut self) -> Self {
        for list in [
            &mut self.publish_allow,
            &mut self.publish_deny,
            &mut self.subscribe_allow,
        ] {
            let mut seen = std::collections::HashSet::new();
            list.retain(|subject| seen.insert(subject.clone()));
        }
        self
    }
}

/// Where the content service publishes the progress of its pulls, in
/// every namespace (`berth.v1.<ns>.content.pull.progress.<pull id>`).
const PULL_PROGRESS: &str = "berth.v1.*.content.pull.progress.>";

/// Read-only operations, as `<service>.<op>` (nodes are any node).
const READ_ONLY_OPS: &[&str] = &[
    "metadata.namespaces.get",
    "metadata.namespaces.list",
    "metadata.images.get",
    "metadata.images.list",
    "metadata.containers.get",
    "metadata.containers.list",
    "metadata.tasks.get",
    "metadata.tasks.list",
    "metadata.leases.get",
    "metadata.leases.list",
    "metadata.leases.query",
    "metadata.nodes.get",
    "metadata.nodes.list",
    "metadata.tombstones.list",
    "content.info",
    "content.list",
    "content.read",
    "content.status",
    "content.ingests",
    "snapshot.*.mounts",
    "snapshot.*.stat",
    "snapshot.*.list",
    "snapshot.*.usage",
    "task.*.state",
    "task.*.list",
    "task.*.logs",
    "task.*.ps",
    "task.*.metrics",
    "gc.explain",
];

/// Operations only services (and the admin) make: a tenant may not. An
/// unconditional `content.delete` is the admin's tool; `snapshot.remove`
/// stays, since removing a container removes its rootfs snapshot with it.
const INTERNAL_OPS: &[&str] = &[
    "content.delete",
    "metadata.gc.>",
    "metadata.tasks.reserve",
    "metadata.tasks.release",
    "metadata.namespaces.list",
    "metadata.tombstones.delete",
    "snapshot.*.prune",
    "gc.run",
];

impl Role {
    /// The seed file's name in an auth directory.
    pub fn file_name(&self) -> String {
        match self {
            Role::Admin => ADMIN_FILE.to_string(),
            Role::Observer => "observer.nk".to_string(),
            Role::Content => "content.nk".to_string(),
            Role::Metadata => "metadata.nk".to_string(),
            Role::Gc => "gc.nk".to_string(),
            Role::Snapshot(node) => format!("snapshot-{node}.nk"),
            Role::Task(node) => format!("task-{node}.nk"),
            Role::Tenant(namespace) => format!("tenant-{namespace}.nk"),
        }
    }

    /// The role a seed file's name stands for; `None` for other files.
    pub fn from_file_name(name: &str) -> Option<Role> {
        let stem = name.strip_suffix(".nk")?;
        let role = match stem {
            "admin" => Role::Admin,
            "observer" => Role::Observer,
            "content" => Role::Content,
            "metadata" => Role::Metadata,
            "gc" => Role::Gc,
            _ => {
                let (kind, token) = stem.split_once('-')?;
                let token = token.to_string();
                match kind {
                    "snapshot" => Role::Snapshot(token),
                    "task" => Role::Task(token),
                    "tenant" => Role::Tenant(token),
                    _ => return None,
                }
            }
        };
        role.check().ok()?;
        Some(role)
    }

    /// Checks the node id or namespace a role carries.
    pub fn check(&self) -> berth_bus::Result<()> {
        match self {
            Role::Snapshot(node) | Role::Task(node) => {
                berth_bus::subject::check_token("node id", node)
            }
            Role::Tenant(namespace) => berth_bus::subject::check_namespace(namespace),
            _ => Ok(()),
        }
    }

    /// A line saying who the identity is, for the generated configuration.
    pub fn describe(&self) -> String {
        match self {
            Role::Admin => "admin: every subject".to_string(),
            Role::Observer => "observer: events, discovery, read-only operations".to_string(),
            Role::Content => "the content service".to_string(),
            Role::Metadata => "the metadata service".to_string(),
            Role::Gc => "the gc service".to_string(),
            Role::Snapshot(node) => format!("the snapshot service of node {node}"),
            Role::Task(node) => format!("the task service of node {node}"),
            Role::Tenant(namespace) => format!("a tenant of namespace {namespace}"),
        }
    }

    /// The permissions of the role for a user whose reply inbox prefix is
    /// `inbox`; `None` for the admin, who may do anything.
    pub fn permissions(&self, inbox: &str) -> Option<Permissions> {
        let own_inbox = format!("{inbox}.>");
        let ops = |list: &[&str]| list.iter().map(|op| format!("berth.v1.*.{op}")).collect();
        let perms = match self {
            Role::Admin => return None,
            Role::Observer => Permissions {
                publish_allow: [ops(READ_ONLY_OPS), discovery(), consume_events()].concat(),
                subscribe_allow: vec![
                    "berth.v1.*.events.>".into(),
                    PULL_PROGRESS.into(),
                    own_inbox,
                ],
                ..Default::default()
            },
            Role::Content => {
                let mut calls = ops(&["metadata.leases.add"]);
                // A pull's progress goes out as plain messages on the
                // service's own subjects, for any follower.
                calls.push(PULL_PROGRESS.into());
                service("berth.v1.*.content.>", calls, &["content"], own_inbox)
            }
            Role::Metadata => {
                let mut perms = service(
                    "berth.v1.*.metadata.>",
                    ops(&["task.*.list"]),
                    &["images", "containers", "leases", "namespaces", "nodes"],
                    own_inbox,
                );
                perms.publish_allow.extend(consume_events());
                // The registry watches every node's heartbeat.
                perms.publish_allow.extend(node_bucket());
                perms.publish_allow.extend([
                    format!("$JS.API.CONSUMER.CREATE.{BUCKET_STREAM}"),
                    format!("$JS.API.CONSUMER.CREATE.{BUCKET_STREAM}.>"),
                    format!("$JS.API.CONSUMER.DELETE.{BUCKET_STREAM}.>"),
                    format!("$JS.API.CONSUMER.INFO.{BUCKET_STREAM}.>"),
                    format!("$JS.FC.{BUCKET_STREAM}.>"),
                ]);
                perms
            }
            Role::Gc => {
                let calls = [
                    ops(&[
                        "metadata.gc.mark",
                        "content.info",
                        "content.list",
                        "content.read",
                        "content.delete",
                        "snapshot.*.list",
                        "snapshot.*.prune",
                    ]),
                    vec!["$SRV.PING.snapshot".into(), "$SRV.INFO.snapshot".into()],
                ]
                .concat();
                let mut perms = service("berth.v1.*.gc.>", calls, &["gc"], own_inbox);
                perms.publish_allow.extend(consume_events());
                perms
            }
            Role::Snapshot(node) => service(
                &format!("berth.v1.*.snapshot.{node}.>"),
                ops(&["content.info", "content.read", "metadata.leases.add"]),
                &["snapshot"],
                own_inbox,
            ),
            Role::Task(node) => {
                let mut calls: Vec<String> = ops(&[
                    "metadata.containers.get",
                    "metadata.tasks.reserve",
                    "metadata.tasks.release",
                    "metadata.tasks.get",
                    "metadata.tombstones.list",
                    "metadata.tombstones.delete",
                    "content.info",
                    "content.read",
                ]);
                calls.push(format!("berth.v1.*.snapshot.{node}.mounts"));
                // Its heartbeat, under its own key only.
                calls.extend(node_bucket());
                calls.push(format!("$KV.{BUCKET}.{node}"));
                service(
                    &format!("berth.v1.*.task.{node}.>"),
                    calls,
                    &["tasks"],
                    own_inbox,
                )
            }
            Role::Tenant(namespace) => tenant(namespace, own_inbox),
        };
        Some(perms.deduplicated())
    }
}

/// A service's permissions: it serves `serves`, calls `calls`, publishes
/// the event topic groups `topics` and keeps the event stream.
fn service(serves: &str, calls: Vec<String>, topics: &[&str], own_inbox: String) -> Permissions {
    let events = topics
        .iter()
        .map(|group| format!("berth.v1.*.events.{group}.>"));
    let stream = [
        format!("$JS.API.STREAM.INFO.{STREAM}"),
        format!("$JS.API.STREAM.CREATE.{STREAM}"),
    ];
    Permissions {
        publish_allow: calls.into_iter().chain(events).chain(stream).collect(),
        publish_deny: Vec::new(),
        subscribe_allow: vec![serves.to_string(), "$SRV.>".to_string(), own_inbox],
        allow_responses: true,
    }
}

/// Opening (or making) the node registry's key-value bucket.
fn node_bucket() -> Vec<String> {
    vec![
        "$JS.API.INFO".to_string(),
        format!("$JS.API.STREAM.INFO.{BUCKET_STREAM}"),
        format!("$JS.API.STREAM.CREATE.{BUCKET_STREAM}"),
    ]
}

/// Sending micro-service discovery requests (not answering them).
fn discovery() -> Vec<String> {
    ["PING", "INFO", "STATS"]
        .iter()
        .flat_map(|verb| [format!("$SRV.{verb}"), format!("$SRV.{verb}.>")])
        .collect()
}

/// Reading the event stream through ephemeral consumers of any filter.
fn consume_events() -> Vec<String> {
    vec![
        format!("$JS.API.STREAM.INFO.{STREAM}"),
        format!("$JS.API.CONSUMER.CREATE.{STREAM}"),
        format!("$JS.API.CONSUMER.CREATE.{STREAM}.>"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.>"),
        format!("$JS.API.CONSUMER.DELETE.{STREAM}.>"),
        format!("$JS.API.CONSUMER.INFO.{STREAM}.>"),
    ]
}

/// A tenant of `namespace`: its own namespace, less events and internal
/// operations; consumers only with a filter in its namespace (the
/// `CONSUMER.CREATE.<stream>.<name>.<filter>` form, which the server checks
/// against the consumer's configuration).
fn tenant(namespace: &str, own_inbox: String) -> Permissions {
    let own = format!("berth.v1.{namespace}");
    let mut publish_allow = vec![format!("{own}.>")];
    publish_allow.extend(
        ["PING", "INFO"]
            .iter()
            .flat_map(|verb| [format!("$SRV.{verb}"), format!("$SRV.{verb}.>")]),
    );
    publish_allow.extend([
        format!("$JS.API.CONSUMER.CREATE.{STREAM}.*.{own}.events.>"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.*"),
        format!("$JS.API.CONSUMER.DELETE.{STREAM}.*"),
    ]);
    // Pull progress is the content service's to say, like events.
    let progress = format!("{own}.content.pull.progress.>");
    let mut publish_deny = vec![format!("{own}.events.>"), progress.clone()];
    publish_deny.extend(INTERNAL_OPS.iter().map(|op| format!("{own}.{op}")));
    Permissions {
        publish_allow,
        publish_deny,
        subscribe_allow: vec![format!("{own}.events.>"), progress, own_inbox],
        allow_responses: false,
    }
}

/// One identity found in an auth directory.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its role.
    pub role: Role,
    /// Its public key (`U…`).
    pub public_key: String,
}

/// An auth directory: seed files by role, and the server configuration.
#[derive(Debug, Clone)]
pub struct AuthDir {
    /// The directory.
    pub dir: PathBuf,
}

impl AuthDir {
    /// The auth directory at `dir` (nothing is read or made yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AuthDir { dir: dir.into() }
    }

    /// The seed file of `role`.
    pub fn seed_file(&self, role: &Role) -> PathBuf {
        self.dir.join(role.file_name())
    }

    /// The `authorization` block's file.
    pub fn conf_file(&self) -> PathBuf {
        self.dir.join(AUTH_CONF)
    }

    /// Makes the directory (mode 0700) and a seed for every role in
    /// `roles` that has none; existing seeds are kept, so this is
    /// idempotent. Returns the roles that got a new seed.
    pub fn ensure(&self, roles: &[Role]) -> anyhow::Result<Vec<Role>> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("create auth directory {}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restrict auth directory {}", self.dir.display()))?;
        let mut made = Vec::new();
        for role in roles {
            role.check()?;
            let path = self.seed_file(role);
            if path.exists() {
                continue;
            }
            let seed = nkeys::KeyPair::new_user()
                .seed()
                .context("make an nkey seed")?;
            write_private(&path, format!("{seed}\n").as_bytes())?;
            made.push(role.clone());
        }
        Ok(made)
    }

    /// Every identity whose seed file is in the directory, by role.
    pub fn identities(&self) -> anyhow::Result<Vec<Identity>> {
        let mut found = BTreeMap::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("read auth directory {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(role) = Role::from_file_name(&name) else {
                continue;
            };
            let seed = read_seed(&entry.path())?;
            let public_key = public_key(&seed)?;
            found.insert(role.clone(), Identity { role, public_key });
        }
        Ok(found.into_values().collect())
    }

    /// The namespaces that have a tenant identity in the directory (none
    /// when it cannot be read).
    pub fn tenants(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut tenants: Vec<String> = entries
            .flatten()
            .filter_map(|entry| Role::from_file_name(&entry.file_name().to_string_lossy()))
            .filter_map(|role| match role {
                Role::Tenant(namespace) => Some(namespace),
                _ => None,
            })
            .collect();
        tenants.sort();
        tenants
    }

    /// Writes the `authorization` block of every identity in the directory
    /// to [`AuthDir::conf_file`] and returns its text.
    pub fn write_conf(&self) -> anyhow::Result<String> {
        let identities = self.identities()?;
        if !identities.iter().any(|i| i.role == Role::Admin) {
            bail!("auth directory {} has no {ADMIN_FILE}", self.dir.display());
        }
        let text = authorization_block(&identities);
        write_private(&self.conf_file(), text.as_bytes())?;
        Ok(text)
    }
}

/// Writes `bytes` to `path` readable by its owner only, replacing it.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("create {}", partial.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// The nats-server `authorization` block of `identities`.
pub fn authorization_block(identities: &[Identity]) -> String {
    let mut out = String::from(
        "# berth's identities: nkey users by role (berthd gen-auth writes this file).\n\
         authorization {\n  users = [\n",
    );
    for identity in identities {
        let _ = writeln!(out, "    # {}", identity.role.describe());
        let inbox = inbox_prefix_for(&identity.public_key);
        match identity.role.permissions(&inbox) {
            None => {
                let _ = writeln!(out, "    {{ nkey: {:?} }}", identity.public_key);
            }
            Some(perms) => {
                let _ = writeln!(out, "    {{\n      nkey: {:?}", identity.public_key);
                out.push_str("      permissions: {\n");
                let _ = writeln!(
                    out,
                    "        publish: {{ allow: {}{} }}",
                    list(&perms.publish_allow),
                    if perms.publish_deny.is_empty() {
                        String::new()
                    } else {
                        format!(", deny: {}", list(&perms.publish_deny))
                    }
                );
                let _ = writeln!(
                    out,
                    "        subscribe: {{ allow: {} }}",
                    list(&perms.subscribe_allow)
                );
                if perms.allow_responses {
                    out.push_str(RESPONSES);
                }
                out.push_str("      }\n    }\n");
            }
        }
    }
    out.push_str("  ]\n}\n");
    out
}

/// A service's leave to answer what it receives. Several answers per reply
/// subject, since gc sends `$SRV.PING` and `$SRV.INFO` with one inbox (the
/// server counts the second request against the leave: `max: 2` refuses
/// the second answer); a day before the leave lapses, since an unpack of a
/// large image answers long after its request (the server's default is
/// two minutes).
const RESPONSES: &str = "        allow_responses: { max: 8, expires: \"24h\" }\n";

/// A list of quoted subjects, as nats-server's configuration reads it.
fn list(subjects: &[String]) -> String {
    let quoted: Vec<String> = subjects.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        let roles = [
            Role::Admin,
            Role::Observer,
            Role::Content,
            Role::Metadata,
            Role::Gc,
            Role::Snapshot("node-1".into()),
            Role::Task("node-1".into()),
            Role::Tenant("team-a".into()),
        ];
        for role in roles {
            assert_eq!(Role::from_file_name(&role.file_name()), Some(role));
        }
        for other in ["nats-auth.conf", "x.nk", "tenant-events.nk", "task-.nk"] {
            assert_eq!(Role::from_file_name(other), None, "{other}");
        }
    }

    #[test]
    fn tenants_are_confined_to_their_namespace() {
        let perms = Role::Tenant("a".into()).permissions("_INBOX_U1").unwrap();
        assert!(perms.publish_allow.contains(&"berth.v1.a.>".to_string()));
        assert!(perms
            .publish_deny
            .contains(&"berth.v1.a.events.>".to_string()));
        assert!(perms
            .publish_deny
            .contains(&"berth.v1.a.metadata.gc.>".to_string()));
        assert_eq!(
            perms.subscribe_allow,
            vec![
                "berth.v1.a.events.>".to_string(),
                "berth.v1.a.content.pull.progress.>".to_string(),
                "_INBOX_U1.>".to_string()
            ]
        );
        assert!(perms
            .publish_deny
            .contains(&"berth.v1.a.content.pull.progress.>".to_string()));
        assert!(!perms.publish_allow.iter().any(|s| s.contains("berth.v1.*")));
    }

    #[test]
    fn a_node_heartbeats_under_its_own_key_and_metadata_watches_them_all() {
        let task = Role::Task("n1".into()).permissions("_INBOX_U3").unwrap();
        assert!(task
            .publish_allow
            .contains(&"$KV.berth_nodes.n1".to_string()));
        assert!(!task.publish_allow.iter().any(|s| s == "$KV.berth_nodes.>"));
        for op in ["tombstones.list", "tombstones.delete"] {
            assert!(task
                .publish_allow
                .contains(&format!("berth.v1.*.metadata.{op}")));
        }
        let metadata = Role::Metadata.permissions("_INBOX_U4").unwrap();
        assert!(metadata
            .publish_allow
            .contains(&"$JS.API.CONSUMER.CREATE.KV_berth_nodes.>".to_string()));
        assert!(!metadata.publish_allow.iter().any(|s| s.starts_with("$KV.")));
        let tenant = Role::Tenant("a".into()).permissions("_INBOX_U5").unwrap();
        assert!(tenant
            .publish_deny
            .contains(&"berth.v1.a.metadata.tombstones.delete".to_string()));
    }

    #[test]
    fn the_observer_changes_nothing() {
        let perms = Role::Observer.permissions("_INBOX_U2").unwrap();
        for subject in &perms.publish_allow {
            for verb in [
                "create", "delete", "kill", "remove", "start", "stop", "commit", "run",
            ] {
                assert!(
                    !subject.ends_with(&format!(".{verb}")),
                    "{subject} changes state"
                );
            }
        }
    }

    #[test]
    fn the_block_lists_every_identity() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let auth = AuthDir::new(dir.path().join("auth"));
        let roles = [
            Role::Admin,
            Role::Task("n1".into()),
            Role::Tenant("a".into()),
        ];
        assert_eq!(auth.ensure(&roles)?.len(), 3);
        assert!(auth.ensure(&roles)?.is_empty());
        let text = auth.write_conf()?;
        assert_eq!(text.matches("nkey:").count(), 3);
        assert!(text.contains("\"berth.v1.*.task.n1.>\""));
        let mode = std::fs::metadata(auth.seed_file(&Role::Admin))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        Ok(())
    }
}
