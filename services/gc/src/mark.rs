//! Mark: the live set of one namespace, derived from metadata's roots and
//! the edges gc reads from content itself.
//!
//! ```text
//! image.target ─┐                      ┌─> child manifest ...
//! container     ├─> manifest or index ─┤
//!  .image_digest┘                      └─> config ──> chain IDs (snapshots)
//!                                      └─> layers
//! container.snapshot_key (on its node)
//! lease: content/<digest>, snapshot/<node>/<key>
//! ```
//!
//! Only manifests, indexes and configs are read, never layers. Blobs are
//! immutable, so what a blob links to is parsed once and kept by digest in
//! the [`Graph`] from run to run; entries no run reaches any more are
//! dropped, so the cache holds at most the live graph.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;

use bytes::Bytes;
use serde::Deserialize;

use crate::chain::chain_ids;
use crate::error::GcError;

/// The largest manifest, index or config gc reads; a bigger one is kept but
/// not followed.
pub const MAX_MANIFEST_SIZE: i64 = 4 << 20;

/// The media types mark tells apart.
pub mod media_type {
    /// An OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// A Docker manifest list.
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// An OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// A Docker image manifest (schema 2).
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// An OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// A Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

    /// True for an index or a manifest list.
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
    }

    /// True for an image manifest.
    pub fn is_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }

    /// True for an image config.
    pub fn is_config(media_type: &str) -> bool {
        media_type == OCI_CONFIG || media_type == DOCKER_CONFIG
    }
}

/// A blob as a manifest or index names it; only what mark needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The blob's media type, empty when unknown.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its size in bytes, 0 when unknown.
    #[serde(default)]
    pub size: i64,
}

impl Descriptor {
    /// A descriptor of which only the digest is known.
    pub fn of_digest(digest: &str) -> Self {
        Descriptor {
            digest: digest.to_string(),
            ..Default::default()
        }
    }
}

/// The roots of one namespace, as read from metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roots {
    /// The namespace.
    pub namespace: String,
    /// Manifests or indexes to follow: image targets, containers' images.
    pub targets: Vec<Descriptor>,
    /// Image configs to follow for their chain IDs.
    pub configs: Vec<String>,
    /// Blobs kept as they are, not followed (leased content).
    pub blobs: Vec<String>,
    /// Snapshots kept on every node (images' top chain IDs).
    pub snapshots: Vec<String>,
    /// Snapshots kept on one node, as `(node, key)`; an empty node means
    /// every node.
    pub node_snapshots: Vec<(String, String)>,
}

/// What must stay in one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveSet {
    /// Live blobs by digest.
    pub blobs: BTreeSet<String>,
    /// Snapshots live on every node: the chain IDs of every reached image.
    pub snapshots: BTreeSet<String>,
    /// Snapshots live on one node only, by node.
    pub node_snapshots: BTreeMap<String, BTreeSet<String>>,
}

impl LiveSet {
    /// Keeps snapshot `key` on `node`, or on every node when `node` is empty.
    pub fn keep_snapshot(&mut self, node: &str, key: &str) {
        if node.is_empty() {
            self.snapshots.insert(key.to_string());
        } else {
            let keys = self.node_snapshots.entry(node.to_string()).or_default();
            keys.insert(key.to_string());
        }
    }

    /// The keys and names that must stay on `node`, sorted.
    pub fn snapshots_on(&self, node: &str) -> Vec<String> {
        let mut keys = self.snapshots.clone();
        if let Some(own) = self.node_snapshots.get(node) {
            keys.extend(own.iter().cloned());
        }
        keys.into_iter().collect()
    }
}

/// Where mark reads manifests, indexes and configs.
pub trait BlobSource {
    /// The whole blob `digest` as `namespace` holds it; `Ok(None)` when the
    /// namespace does not hold it or it is over [`MAX_MANIFEST_SIZE`].
    fn read(
        &self,
        namespace: &str,
        digest: &str,
    ) -> impl Future<Output = berth_bus::Result<Option<Bytes>>> + Send;
}

/// How a blob is reached, which decides how it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A manifest or an index.
    Target,
    /// An image config.
    Config,
    /// Anything else (layers, artifacts): kept, never read.
    Leaf,
}

impl Role {
    /// The role of an index's child.
    pub fn of_child(child: &Descriptor) -> Role {
        let media_type = child.media_type.as_str();
        if media_type.is_empty()
            || media_type::is_index(media_type)
            || media_type::is_manifest(media_type)
        {
            Role::Target
        } else {
            Role::Leaf
        }
    }

    /// The role of a manifest's config.
    pub fn of_config(config: &Descriptor) -> Role {
        let media_type = config.media_type.as_str();
        if media_type.is_empty() || media_type::is_config(media_type) {
            Role::Config
        } else {
            Role::Leaf
        }
    }
}

/// What one blob links to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// An index or manifest list: its manifests.
    Index(Vec<Descriptor>),
    /// A manifest: its config and its layers.
    Manifest {
        /// The config blob.
        config: Descriptor,
        /// The layer blobs, base first.
        layers: Vec<Descriptor>,
    },
    /// An image config: the chain ID of every layer prefix, base first.
    Config(Vec<String>),
    /// Nothing.
    Leaf,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TargetDoc {
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct ConfigDoc {
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// Reads the edges of a blob reached as `role`, whose descriptor says
/// `media_type` (possibly empty). An index is told by the media type in the
/// JSON or in the descriptor, or by a `manifests` list without a `config`.
pub fn parse(role: Role, media_type: &str, bytes: &[u8]) -> Result<Node, serde_json::Error> {
    match role {
        Role::Leaf => Ok(Node::Leaf),
        Role::Config => {
            let doc: ConfigDoc = serde_json::from_slice(bytes)?;
            let diff_ids = doc.rootfs.map(|rootfs| rootfs.diff_ids).unwrap_or_default();
            Ok(Node::Config(chain_ids(&diff_ids)))
        }
        Role::Target => {
            let doc: TargetDoc = serde_json::from_slice(bytes)?;
            let declared = doc.media_type.as_deref().unwrap_or_default();
            let listed = doc.manifests.is_some() && doc.config.is_none();
            if media_type::is_index(declared) || media_type::is_index(media_type) || listed {
                return Ok(Node::Index(doc.manifests.unwrap_or_default()));
            }
            Ok(match doc.config {
                Some(config) => Node::Manifest {
                    config,
                    layers: doc.layers.unwrap_or_default(),
                },
                None => Node::Leaf,
            })
        }
    }
}

/// True for `sha256:` and 64 lowercase hex digits, the only digests berth
/// stores; anything else cannot name a blob and is not followed.
pub fn is_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The edges read so far, kept from run to run.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: HashMap<(Role, String), Node>,
    reached: HashSet<(Role, String)>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Graph::default()
    }

    /// How many parsed blobs the graph holds.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the graph holds nothing.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// What a blob reached as `role` links to, if it was read and parsed.
    pub fn get(&self, role: Role, digest: &str) -> Option<&Node> {
        self.nodes.get(&(role, digest.to_string()))
    }

    /// Puts a parsed blob in the cache, as if it had been read.
    #[cfg(test)]
    pub(crate) fn insert(&mut self, role: Role, digest: &str, node: Node) {
        self.nodes.insert((role, digest.to_string()), node);
    }

    /// Derives the live set of `roots`, reading what the cache lacks from
    /// `source` in the roots' namespace.
    ///
    /// A blob the namespace does not hold is kept but not followed. A read
    /// that fails otherwise fails the whole derivation (`GcError::Read`),
    /// since sweeping with a partial live set would delete live objects.
    pub async fn live_set<S: BlobSource + Sync>(
        &mut self,
        source: &S,
        roots: &Roots,
    ) -> Result<LiveSet, GcError> {
        let mut live = LiveSet::default();
        live.blobs
            .extend(roots.blobs.iter().filter(|d| is_digest(d)).cloned());
        live.snapshots.extend(roots.snapshots.iter().cloned());
        for (node, key) in &roots.node_snapshots {
            live.keep_snapshot(node, key);
        }

        let mut queue: Vec<(Role, Descriptor)> = Vec::new();
        queue.extend(
            roots
                .targets
                .iter()
                .map(|target| (Role::Target, target.clone())),
        );
        queue.extend(
            roots
                .configs
                .iter()
                .map(|d| (Role::Config, Descriptor::of_digest(d))),
        );
        let mut visited = HashSet::new();
        while let Some((role, descriptor)) = queue.pop() {
            if !is_digest(&descriptor.digest) {
                tracing::debug!(
                    namespace = %roots.namespace,
                    digest = %descriptor.digest,
                    "malformed digest not followed",
                );
                continue;
            }
            live.blobs.insert(descriptor.digest.clone());
            if role == Role::Leaf || !visited.insert((role, descriptor.digest.clone())) {
                continue;
            }

            match self
                .node(source, &roots.namespace, role, &descriptor)
                .await?
            {
                Node::Index(children) => {
                    queue.extend(
                        children
                            .into_iter()
                            .map(|child| (Role::of_child(&child), child)),
                    );
                }
                Node::Manifest { config, layers } => {
                    queue.push((Role::of_config(&config), config));
                    queue.extend(layers.into_iter().map(|layer| (Role::Leaf, layer)));
                }
                Node::Config(chain) => live.snapshots.extend(chain),
                Node::Leaf => {}
            }
        }
        Ok(live)
    }

    /// Drops what no derivation reached since the last call, and starts
    /// counting again; called after every complete run.
    pub fn forget_unreached(&mut self) {
        let reached = std::mem::take(&mut self.reached);
        self.nodes.retain(|key, _| reached.contains(key));
    }

    /// The edges of one blob, from the cache or read and parsed.
    async fn node<S: BlobSource + Sync>(
        &mut self,
        source: &S,
        namespace: &str,
        role: Role,
        descriptor: &Descriptor,
    ) -> Result<Node, GcError> {
        let key = (role, descriptor.digest.clone());
        self.reached.insert(key.clone());
        if let Some(node) = self.nodes.get(&key) {
            return Ok(node.clone());
        }
        if descriptor.size > MAX_MANIFEST_SIZE {
            tracing::warn!(
                namespace,
                digest = %descriptor.digest,
                size = descriptor.size,
                "blob too large to follow; kept as it is",
            );
            return Ok(Node::Leaf);
        }

        let bytes = match source.read(namespace, &descriptor.digest).await {
            Ok(Some(bytes)) => bytes,
            // Not cached: the namespace may commit it later.
            Ok(None) => return Ok(Node::Leaf),
            Err(err) => {
                return Err(GcError::Read {
                    namespace: namespace.to_string(),
                    digest: descriptor.digest.clone(),
                    source: err,
                })
            }
        };
        let node = parse(role, &descriptor.media_type, &bytes).unwrap_or_else(|err| {
            // Import refuses malformed JSON, so this blob was never part of
            // an image berth made; it links to nothing gc can know.
            tracing::warn!(
                namespace,
                digest = %descriptor.digest,
                error = %err,
                "blob is not valid JSON; not followed",
            );
            Node::Leaf
        });
        self.nodes.insert(key, node.clone());
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images");

    const BUSYBOX_MANIFEST: &str =
        "sha256:91cd2d477823893e647722a7bbb54835693458bd0e91d8b7daa8c7118bd8f57a";
    const BUSYBOX_CONFIG: &str =
        "sha256:c61bf6ac9b93b0cdbedf841171164dbc9e0e8a49689f06ddaf821362f09b714d";
    const BUSYBOX_LAYER: &str =
        "sha256:7ac49a7f8968043e1e30b4fb08cb7d9e2662b55d4993a6ea25c6a4de2ce94503";
    const BUSYBOX_DIFF_ID: &str =
        "sha256:a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";
    const MULTIARCH_INDEX: &str =
        "sha256:ad6e1f42345038ac4389a7cba77da6d01cf4380c127c81f93bde34f56a42c213";
    const ARM64_MANIFEST: &str =
        "sha256:1d62bd216c092342ce5a6afaf6714304f48cb2c7e8585d7c1a5735fd14f6c1a8";
    const ARM64_CONFIG: &str =
        "sha256:56bdf61f2cf6922eadcbd6f82e841056bcb3081fd2ec272ef8d5cd1f1e8b064c";
    const ARM64_LAYER: &str =
        "sha256:236d021b7c06cef9bc2defcb508aa03a98ecb328133107448e86ee118fee0014";
    const ARM64_DIFF_ID: &str =
        "sha256:acfe818664ed459794e677bf3fe2023265fd2aa4aaa84cdd7e811f47ac9ccde1";
    const LAYERS_MANIFEST: &str =
        "sha256:14bb6206fd46eb528868c4c11cc1cec8bc30f0c540ff05b967d250d0812f1749";

    /// The blobs of OCI layout archives, served as content would; counts reads.
    #[derive(Default)]
    struct Archive {
        blobs: HashMap<String, Bytes>,
        reads: AtomicUsize,
        fail: bool,
    }

    impl Archive {
        fn open(paths: &[&str]) -> Archive {
            let mut archive = Archive::default();
            for path in paths {
                let file = std::fs::File::open(format!("{FIXTURES}/{path}")).unwrap();
                let mut tar = tar::Archive::new(file);
                for entry in tar.entries().unwrap() {
                    let mut entry = entry.unwrap();
                    let name = entry.path().unwrap().to_string_lossy().into_owned();
                    let Some(hex) = name.strip_prefix("blobs/sha256/") else {
                        continue;
                    };
                    if hex.is_empty() {
                        continue;
                    }
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).unwrap();
                    archive.blobs.insert(format!("sha256:{hex}"), data.into());
                }
            }
            archive
        }
    }

    impl BlobSource for Archive {
        async fn read(&self, _namespace: &str, digest: &str) -> berth_bus::Result<Option<Bytes>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(berth_bus::Error::unavailable("content is down"));
            }
            Ok(self.blobs.get(digest).cloned())
        }
    }

    fn image_roots(target: Descriptor) -> Roots {
        Roots {
            namespace: "default".into(),
            targets: vec![target],
            ..Default::default()
        }
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|item| item.to_string()).collect()
    }

    /// A single-platform image keeps its manifest, config and layer, and the
    /// chain ID of its one layer.
    #[tokio::test]
    async fn busybox_manifest() {
        let archive = Archive::open(&["busybox/busybox.oci.tar"]);
        let target = Descriptor {
            media_type: media_type::OCI_MANIFEST.into(),
            digest: BUSYBOX_MANIFEST.into(),
            size: 349,
        };
        let live = Graph::new()
            .live_set(&archive, &image_roots(target))
            .await
            .unwrap();
        assert_eq!(
            live.blobs,
            set(&[BUSYBOX_MANIFEST, BUSYBOX_CONFIG, BUSYBOX_LAYER])
        );
        assert_eq!(live.snapshots, set(&[BUSYBOX_DIFF_ID]));
        assert!(live.node_snapshots.is_empty());
    }

    /// An index keeps every platform's manifest, config, layers and chain IDs.
    #[tokio::test]
    async fn multiarch_index() {
        let archive = Archive::open(&["multiarch/multiarch.oci.tar"]);
        let target = Descriptor {
            media_type: media_type::OCI_INDEX.into(),
            digest: MULTIARCH_INDEX.into(),
            size: 506,
        };
        let live = Graph::new()
            .live_set(&archive, &image_roots(target))
            .await
            .unwrap();
        let expected = [
            MULTIARCH_INDEX,
            BUSYBOX_MANIFEST,
            BUSYBOX_CONFIG,
            BUSYBOX_LAYER,
            ARM64_MANIFEST,
            ARM64_CONFIG,
            ARM64_LAYER,
        ];
        assert_eq!(live.blobs, set(&expected));
        assert_eq!(live.snapshots, set(&[BUSYBOX_DIFF_ID, ARM64_DIFF_ID]));
    }

    /// A six-layer image keeps the chain ID of every layer prefix.
    #[tokio::test]
    async fn layers_chain_ids() {
        let archive = Archive::open(&["layers/layers.oci.tar"]);
        let live = Graph::new()
            .live_set(
                &archive,
                &image_roots(Descriptor::of_digest(LAYERS_MANIFEST)),
            )
            .await
            .unwrap();
        assert_eq!(live.blobs.len(), 1 + 1 + 6);
        assert_eq!(live.snapshots.len(), 6);
        assert!(live.snapshots.contains(BUSYBOX_DIFF_ID));
    }

    /// A container keeps its image's content and chain IDs everywhere, its
    /// own snapshot only on its node; leases keep their resources as they are.
    #[tokio::test]
    async fn container_and_lease_roots() {
        let archive = Archive::open(&["busybox/busybox.oci.tar"]);
        let leased_blob = format!("sha256:{}", "e".repeat(64));
        let roots = Roots {
            namespace: "default".into(),
            targets: vec![Descriptor::of_digest(BUSYBOX_MANIFEST)],
            blobs: vec![leased_blob.clone(), "not-a-digest".into()],
            node_snapshots: vec![
                ("node-1".into(), "c1-rootfs".into()),
                ("node-2".into(), "import-1".into()),
            ],
            ..Default::default()
        };
        let live = Graph::new().live_set(&archive, &roots).await.unwrap();
        let expected = [
            BUSYBOX_MANIFEST,
            BUSYBOX_CONFIG,
            BUSYBOX_LAYER,
            leased_blob.as_str(),
        ];
        assert_eq!(live.blobs, set(&expected));
        assert_eq!(
            live.snapshots_on("node-1"),
            vec!["c1-rootfs", BUSYBOX_DIFF_ID]
        );
        assert_eq!(
            live.snapshots_on("node-2"),
            vec!["import-1", BUSYBOX_DIFF_ID]
        );
        assert_eq!(live.snapshots_on("node-3"), vec![BUSYBOX_DIFF_ID]);
    }

    /// A target the namespace does not hold is kept but leads nowhere, and
    /// an image's resolved config still yields its chain IDs.
    #[tokio::test]
    async fn missing_target_and_config_root() {
        let archive = Archive::open(&["busybox/busybox.oci.tar"]);
        let missing = format!("sha256:{}", "0".repeat(64));
        let roots = Roots {
            namespace: "default".into(),
            targets: vec![Descriptor::of_digest(&missing)],
            configs: vec![BUSYBOX_CONFIG.into()],
            ..Default::default()
        };
        let live = Graph::new().live_set(&archive, &roots).await.unwrap();
        assert_eq!(live.blobs, set(&[missing.as_str(), BUSYBOX_CONFIG]));
        assert_eq!(live.snapshots, set(&[BUSYBOX_DIFF_ID]));
    }

    /// Parsed blobs are cached: a second derivation reads nothing, and what
    /// a run no longer reaches is forgotten.
    #[tokio::test]
    async fn cache_by_digest() {
        let archive = Archive::open(&["busybox/busybox.oci.tar"]);
        let mut graph = Graph::new();
        let roots = image_roots(Descriptor::of_digest(BUSYBOX_MANIFEST));
        let first = graph.live_set(&archive, &roots).await.unwrap();
        graph.forget_unreached();
        assert_eq!(archive.reads.load(Ordering::SeqCst), 2);
        assert_eq!(graph.len(), 2);

        let second = graph.live_set(&archive, &roots).await.unwrap();
        graph.forget_unreached();
        assert_eq!(first, second);
        assert_eq!(archive.reads.load(Ordering::SeqCst), 2);

        graph.live_set(&archive, &Roots::default()).await.unwrap();
        graph.forget_unreached();
        assert!(graph.is_empty());
    }

    /// A failed read fails the derivation, naming the blob.
    #[tokio::test]
    async fn failed_read_fails() {
        let archive = Archive {
            fail: true,
            ..Default::default()
        };
        let roots = image_roots(Descriptor::of_digest(BUSYBOX_MANIFEST));
        let err = Graph::new().live_set(&archive, &roots).await.unwrap_err();
        assert!(matches!(&err, GcError::Read { digest, .. } if digest == BUSYBOX_MANIFEST));
        assert_eq!(err.code(), berth_bus::Code::Unavailable);
    }

    /// An index is told by the descriptor's media type when its JSON lacks
    /// one, and a manifest by its config.
    #[test]
    fn parse_by_descriptor_media_type() {
        let archive = Archive::open(&["multiarch/multiarch.oci.tar"]);
        let mut index: serde_json::Value =
            serde_json::from_slice(&archive.blobs[MULTIARCH_INDEX]).unwrap();
        index.as_object_mut().unwrap().remove("mediaType");
        let bytes = serde_json::to_vec(&index).unwrap();
        let node = parse(Role::Target, media_type::DOCKER_MANIFEST_LIST, &bytes).unwrap();
        assert!(matches!(node, Node::Index(children) if children.len() == 2));

        let node = parse(Role::Target, "", &archive.blobs[ARM64_MANIFEST]).unwrap();
        let Node::Manifest { config, layers } = node else {
            panic!("not a manifest: {node:?}");
        };
        assert_eq!(config.digest, ARM64_CONFIG);
        assert_eq!(config.media_type, media_type::OCI_CONFIG);
        assert_eq!(layers.len(), 1);

        let node = parse(Role::Config, "", &archive.blobs[ARM64_CONFIG]).unwrap();
        assert_eq!(node, Node::Config(vec![ARM64_DIFF_ID.to_string()]));
        assert!(parse(Role::Target, "", &archive.blobs[ARM64_LAYER]).is_err());
    }

    /// Only berth's digest form is followed.
    #[test]
    fn digests() {
        assert!(is_digest(BUSYBOX_MANIFEST));
        for bad in [
            "",
            "sha256:",
            "sha512:00",
            "sha256:ABC",
            &BUSYBOX_MANIFEST[..70],
        ] {
            assert!(!is_digest(bad), "{bad:?}");
        }
    }
}
