//! Why an object stays: the shortest path of references from a root to it.
//!
//! The walk is a breadth-first search from every root of one namespace at
//! once, over the same edges mark follows (index -> manifests -> config and
//! layers, config -> chain IDs) plus each snapshot's committed parent on the
//! node asked about. Roots are tried in the order metadata lists them
//! (images, containers, leases), so of two equally short paths the image's
//! wins. Nothing here reads: the blobs' edges come from the [`Graph`] a mark
//! just filled, and a blob it never parsed (not stored, too large, not JSON)
//! leads nowhere, as in mark.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use crate::mark::{is_digest, media_type, Descriptor, Graph, Node, Role};

/// The prefix of the keys of layers being unpacked (`extract-<random>`),
/// reserved by the snapshot service's contract: prune keeps them, so they
/// stay without any root.
pub const EXTRACT_PREFIX: &str = "extract-";

/// What kind of root an explanation starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// An image, by name.
    Image,
    /// A container, by id.
    Container,
    /// An unexpired lease, by id.
    Lease,
}

/// A root as metadata names it, with what it refers to directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// Image, container or lease.
    pub kind: RootKind,
    /// The image name, container id or lease id.
    pub name: String,
    /// What it keeps, in the order it is walked.
    pub refs: Vec<Ref>,
}

/// One thing a root keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    /// A blob followed as `role` (a [`Role::Leaf`] is kept as it is).
    Blob(Role, Descriptor),
    /// A snapshot, on `node`, or on every node when `node` is empty.
    Snapshot {
        /// The node, or empty.
        node: String,
        /// The snapshot key.
        key: String,
    },
}

/// The kind of one step on a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Root: an image.
    Image,
    /// Root: a container.
    Container,
    /// Root: a lease.
    Lease,
    /// An index or manifest list.
    Index,
    /// An image manifest.
    Manifest,
    /// An image config.
    Config,
    /// A layer of a manifest.
    Layer,
    /// Any other blob: leased content, an index's non-image child.
    Blob,
    /// A snapshot a root or a config names.
    Snapshot,
    /// The committed parent of the snapshot before it.
    Parent,
    /// Root: a layer being unpacked.
    Unpack,
}

impl StepKind {
    /// The word the path is written with.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Image => "image",
            StepKind::Container => "container",
            StepKind::Lease => "lease",
            StepKind::Index => "index",
            StepKind::Manifest => "manifest",
            StepKind::Config => "config",
            StepKind::Layer => "layer",
            StepKind::Blob => "blob",
            StepKind::Snapshot => "snapshot",
            StepKind::Parent => "parent",
            StepKind::Unpack => "unpack",
        }
    }
}

impl From<RootKind> for StepKind {
    fn from(kind: RootKind) -> Self {
        match kind {
            RootKind::Image => StepKind::Image,
            RootKind::Container => StepKind::Container,
            RootKind::Lease => StepKind::Lease,
        }
    }
}

/// One reference on a path: what it is and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What it is.
    pub kind: StepKind,
    /// Image name, container id, lease id, digest or snapshot key.
    pub name: String,
}

impl Step {
    fn new(kind: StepKind, name: &str) -> Self {
        Step {
            kind,
            name: name.to_string(),
        }
    }
}

/// A path written as `image busybox -> manifest sha256:… -> layer sha256:…`.
pub struct Path<'a>(pub &'a [Step]);

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, step) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(" -> ")?;
            }
            write!(f, "{} {}", step.kind.as_str(), step.name)?;
        }
        Ok(())
    }
}

/// What is being explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object<'a> {
    /// A blob, by digest.
    Blob(&'a str),
    /// A snapshot on one node, by key.
    Snapshot {
        /// The node.
        node: &'a str,
        /// The key.
        key: &'a str,
    },
}

/// What the next run does with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stored and reached: it stays.
    Kept,
    /// Stored, reached from nothing: it goes at the next run unless reused first.
    Unreferenced,
    /// Reached but not stored.
    Missing,
    /// Neither stored nor reached.
    Unknown,
}

impl Verdict {
    /// The verdict for an object that is `stored` or not, reached by `path` or not.
    pub fn of(stored: bool, path: Option<&[Step]>) -> Verdict {
        match (stored, path.is_some()) {
            (true, true) => Verdict::Kept,
            (true, false) => Verdict::Unreferenced,
            (false, true) => Verdict::Missing,
            (false, false) => Verdict::Unknown,
        }
    }
}

/// The answer for one object: a blob, or a snapshot on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The node of a snapshot; `None` for a blob.
    pub node: Option<String>,
    /// What the next run does with it.
    pub verdict: Verdict,
    /// Root first, the object last; empty when nothing reaches it.
    pub path: Vec<Step>,
}

impl Explanation {
    /// The explanation of an object `stored` or not, reached by `path` or not.
    pub fn new(node: Option<&str>, stored: bool, path: Option<Vec<Step>>) -> Self {
        Explanation {
            node: node.map(str::to_string),
            verdict: Verdict::of(stored, path.as_deref()),
            path: path.unwrap_or_default(),
        }
    }

    /// The explanation in words, e.g. `kept: container c1 -> snapshot c1`.
    pub fn reason(&self) -> String {
        let place = match &self.node {
            Some(node) => format!(" on node {node}"),
            None => String::new(),
        };
        let path = Path(&self.path);
        match self.verdict {
            Verdict::Kept => format!("kept{place}: {path}"),
            Verdict::Unreferenced => {
                format!("unreferenced{place}: goes at the next run unless reused before it")
            }
            Verdict::Missing => format!("referenced{place} but not stored: {path}"),
            Verdict::Unknown => "unknown: no root reaches it and it is not stored".to_string(),
        }
    }
}

/// A point of the walk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Vertex {
    Blob(Role, String),
    Snapshot(String),
}

/// How the walk first got to a vertex.
struct Arrival {
    /// The vertex before it, or `None` when a root refers to it directly.
    from: Option<Vertex>,
    /// The root the walk started from.
    root: usize,
    /// The vertex as a step.
    step: Step,
}

/// The shortest path from one of `roots` to `object`, root first; `None`
/// when no root reaches it.
///
/// Blob edges come from what `graph` holds; `parents` maps each snapshot
/// key on the node of a snapshot object to its committed parent (empty for
/// a blob object, whose paths never go through snapshots).
pub fn find(
    roots: &[Root],
    graph: &Graph,
    parents: &HashMap<String, String>,
    object: Object<'_>,
) -> Option<Vec<Step>> {
    let mut arrivals: HashMap<Vertex, Arrival> = HashMap::new();
    let mut queue = VecDeque::new();
    for (index, root) in roots.iter().enumerate() {
        for next in root_edges(root, graph, object) {
            visit(&mut arrivals, &mut queue, None, index, next);
        }
    }

    while let Some(vertex) = queue.pop_front() {
        if reaches(&vertex, object) {
            return Some(path_to(&arrivals, roots, vertex));
        }
        let root = arrivals[&vertex].root;
        for next in edges(&vertex, graph, parents) {
            visit(&mut arrivals, &mut queue, Some(&vertex), root, next);
        }
    }
    None
}

/// Records the first arrival at a vertex and queues it.
fn visit(
    arrivals: &mut HashMap<Vertex, Arrival>,
    queue: &mut VecDeque<Vertex>,
    from: Option<&Vertex>,
    root: usize,
    (vertex, step): (Vertex, Step),
) {
    if arrivals.contains_key(&vertex) {
        return;
    }
    let arrival = Arrival {
        from: from.cloned(),
        root,
        step,
    };
    arrivals.insert(vertex.clone(), arrival);
    queue.push_back(vertex);
}

/// True when `vertex` is the object asked about.
fn reaches(vertex: &Vertex, object: Object<'_>) -> bool {
    match (vertex, object) {
        (Vertex::Blob(_, digest), Object::Blob(wanted)) => digest == wanted,
        (Vertex::Snapshot(key), Object::Snapshot { key: wanted, .. }) => key == wanted,
        _ => false,
    }
}

/// The steps back from `vertex` to its root, turned round.
fn path_to(arrivals: &HashMap<Vertex, Arrival>, roots: &[Root], vertex: Vertex) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut next = Some(vertex);
    let mut root = 0;
    while let Some(vertex) = next {
        let arrival = &arrivals[&vertex];
        steps.push(arrival.step.clone());
        root = arrival.root;
        next = arrival.from.clone();
    }
    let root = &roots[root];
    steps.push(Step::new(root.kind.into(), &root.name));
    steps.reverse();
    steps
}

/// What a root refers to, as the walk sees it: snapshots of other nodes
/// are left out, and so are all snapshots when a blob is asked about.
fn root_edges(root: &Root, graph: &Graph, object: Object<'_>) -> Vec<(Vertex, Step)> {
    let mut out = Vec::new();
    for reference in &root.refs {
        match reference {
            Ref::Blob(role, descriptor) => out.extend(blob_edge(*role, descriptor, graph, None)),
            Ref::Snapshot { node, key } => {
                let Object::Snapshot { node: wanted, .. } = object else {
                    continue;
                };
                if node.is_empty() || node == wanted {
                    let step = Step::new(StepKind::Snapshot, key);
                    out.push((Vertex::Snapshot(key.clone()), step));
                }
            }
        }
    }
    out
}

/// What one vertex links to.
fn edges(vertex: &Vertex, graph: &Graph, parents: &HashMap<String, String>) -> Vec<(Vertex, Step)> {
    match vertex {
        Vertex::Snapshot(key) => parents
            .get(key)
            .filter(|parent| !parent.is_empty())
            .map(|parent| {
                let step = Step::new(StepKind::Parent, parent);
                (Vertex::Snapshot(parent.clone()), step)
            })
            .into_iter()
            .collect(),
        Vertex::Blob(role, digest) => match graph.get(*role, digest) {
            Some(Node::Index(children)) => children
                .iter()
                .filter_map(|child| blob_edge(Role::of_child(child), child, graph, None))
                .collect(),
            Some(Node::Manifest { config, layers }) => {
                let config = blob_edge(Role::of_config(config), config, graph, None);
                let layers = layers
                    .iter()
                    .filter_map(|layer| blob_edge(Role::Leaf, layer, graph, Some(StepKind::Layer)));
                config.into_iter().chain(layers).collect()
            }
            Some(Node::Config(chain_ids)) => chain_ids
                .iter()
                .map(|chain_id| {
                    let step = Step::new(StepKind::Snapshot, chain_id);
                    (Vertex::Snapshot(chain_id.clone()), step)
                })
                .collect(),
            Some(Node::Leaf) | None => Vec::new(),
        },
    }
}

/// The vertex and step of a blob reached as `role`; `None` for a digest
/// mark would not follow either. `leaf` names a leaf's step (a layer),
/// which is otherwise a plain blob.
fn blob_edge(
    role: Role,
    descriptor: &Descriptor,
    graph: &Graph,
    leaf: Option<StepKind>,
) -> Option<(Vertex, Step)> {
    if !is_digest(&descriptor.digest) {
        return None;
    }
    let kind = match role {
        Role::Config => StepKind::Config,
        Role::Leaf => leaf.unwrap_or(StepKind::Blob),
        Role::Target => match graph.get(role, &descriptor.digest) {
            Some(Node::Index(_)) => StepKind::Index,
            Some(Node::Manifest { .. }) => StepKind::Manifest,
            _ if media_type::is_index(&descriptor.media_type) => StepKind::Index,
            _ => StepKind::Manifest,
        },
    };
    let step = Step::new(kind, &descriptor.digest);
    Some((Vertex::Blob(role, descriptor.digest.clone()), step))
}

#[cfg(test)]
mod tests;
