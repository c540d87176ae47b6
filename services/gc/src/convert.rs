//! Between the wire and the domain: metadata's roots as the [`Roots`] mark
//! walks and the named [`Root`]s explain walks, and explanations back as
//! gc's wire types.

use berth_proto::gc as pb;
use berth_proto::metadata as mdpb;

use crate::explain::path::{Explanation, Ref, Root, RootKind, Step, StepKind, Verdict};
use crate::mark::{Descriptor, Role, Roots};

/// The roots of one namespace as metadata's `gc.mark` gives them.
///
/// An image keeps its target, its resolved config and its top chain ID. A
/// container keeps its image's manifest (`image_digest`, or the target of
/// the image it names when that is empty) and its snapshot on its node. A
/// lease keeps each resource as it is: an import attaches every blob and
/// snapshot it makes to its lease, so leased blobs are not followed.
pub(crate) fn roots(ns: &mdpb::NamespaceRoots) -> Roots {
    let mut roots = Roots {
        namespace: ns.namespace.clone(),
        ..Default::default()
    };
    for image in &ns.images {
        if let Some(target) = &image.target {
            roots.targets.push(descriptor(target));
        }
        if !image.config_digest.is_empty() {
            roots.configs.push(image.config_digest.clone());
        }
        if !image.chain_id.is_empty() {
            roots.snapshots.push(image.chain_id.clone());
        }
    }

    for container in &ns.containers {
        roots.targets.extend(image_target(ns, container));
        if !container.snapshot_key.is_empty() {
            let key = (container.node.clone(), container.snapshot_key.clone());
            roots.node_snapshots.push(key);
        }
    }

    for lease in &ns.leases {
        for resource in &lease.resources {
            add_resource(&mut roots, &lease.lease_id, resource);
        }
    }
    roots
}

/// The manifest a container keeps: its `image_digest`, or else the target
/// of the image it names.
fn image_target(ns: &mdpb::NamespaceRoots, container: &mdpb::Container) -> Option<Descriptor> {
    if !container.image_digest.is_empty() {
        return Some(Descriptor::of_digest(&container.image_digest));
    }
    ns.images
        .iter()
        .find(|image| image.name == container.image)
        .and_then(|image| image.target.as_ref())
        .map(descriptor)
}

/// Adds one lease resource: `content/<digest>` or `snapshot/<node>/<key>`.
fn add_resource(roots: &mut Roots, lease_id: &str, resource: &str) {
    match lease_ref(resource) {
        Some(Ref::Blob(_, blob)) => roots.blobs.push(blob.digest),
        Some(Ref::Snapshot { node, key }) => roots.node_snapshots.push((node, key)),
        None => tracing::debug!(lease_id, resource, "unknown lease resource ignored"),
    }
}

/// One lease resource as a reference: a blob kept as it is, or a snapshot
/// on one node; `None` for anything else.
fn lease_ref(resource: &str) -> Option<Ref> {
    if let Some(digest) = resource.strip_prefix("content/") {
        return Some(Ref::Blob(Role::Leaf, Descriptor::of_digest(digest)));
    }
    let (node, key) = resource.strip_prefix("snapshot/")?.split_once('/')?;
    Some(Ref::Snapshot {
        node: node.to_string(),
        key: key.to_string(),
    })
}

/// The roots of one namespace by name, each with what it refers to, in the
/// order explain tries them: images, containers, leases. An image refers
/// to its top chain ID first, so a layer snapshot is explained through its
/// parents rather than through the config.
pub(crate) fn named_roots(ns: &mdpb::NamespaceRoots) -> Vec<Root> {
    let mut roots = Vec::new();
    for image in &ns.images {
        let mut refs = Vec::new();
        if !image.chain_id.is_empty() {
            refs.push(everywhere(&image.chain_id));
        }
        if let Some(target) = &image.target {
            refs.push(Ref::Blob(Role::Target, descriptor(target)));
        }
        if !image.config_digest.is_empty() {
            let config = Descriptor::of_digest(&image.config_digest);
            refs.push(Ref::Blob(Role::Config, config));
        }
        roots.push(root(RootKind::Image, &image.name, refs));
    }

    for container in &ns.containers {
        let mut refs = Vec::new();
        if !container.snapshot_key.is_empty() {
            refs.push(Ref::Snapshot {
                node: container.node.clone(),
                key: container.snapshot_key.clone(),
            });
        }
        if let Some(target) = image_target(ns, container) {
            refs.push(Ref::Blob(Role::Target, target));
        }
        roots.push(root(RootKind::Container, &container.container_id, refs));
    }

    for lease in &ns.leases {
        let refs = lease
            .resources
            .iter()
            .filter_map(|r| lease_ref(r))
            .collect();
        roots.push(root(RootKind::Lease, &lease.lease_id, refs));
    }
    roots
}

fn root(kind: RootKind, name: &str, refs: Vec<Ref>) -> Root {
    Root {
        kind,
        name: name.to_string(),
        refs,
    }
}

fn everywhere(key: &str) -> Ref {
    Ref::Snapshot {
        node: String::new(),
        key: key.to_string(),
    }
}

/// One explanation on the wire. An unknown object is of no kind.
pub(crate) fn explanation(explanation: &Explanation) -> pb::Explanation {
    let kind = match (&explanation.node, explanation.verdict) {
        (_, Verdict::Unknown) => pb::ObjectKind::Unspecified,
        (Some(_), _) => pb::ObjectKind::Snapshot,
        (None, _) => pb::ObjectKind::Blob,
    };
    let verdict = match explanation.verdict {
        Verdict::Kept => pb::Verdict::Kept,
        Verdict::Unreferenced => pb::Verdict::Unreferenced,
        Verdict::Missing => pb::Verdict::Missing,
        Verdict::Unknown => pb::Verdict::Unknown,
    };
    pb::Explanation {
        kind: kind.into(),
        node: explanation.node.clone().unwrap_or_default(),
        verdict: verdict.into(),
        path: explanation.path.iter().map(step).collect(),
        reason: explanation.reason(),
    }
}

fn step(step: &Step) -> pb::Step {
    let kind = match step.kind {
        StepKind::Image => pb::StepKind::Image,
        StepKind::Container => pb::StepKind::Container,
        StepKind::Lease => pb::StepKind::Lease,
        StepKind::Index => pb::StepKind::Index,
        StepKind::Manifest => pb::StepKind::Manifest,
        StepKind::Config => pb::StepKind::Config,
        StepKind::Layer => pb::StepKind::Layer,
        StepKind::Blob => pb::StepKind::Blob,
        StepKind::Snapshot => pb::StepKind::Snapshot,
        StepKind::Parent => pb::StepKind::Parent,
        StepKind::Unpack => pb::StepKind::Unpack,
    };
    pb::Step {
        kind: kind.into(),
        name: step.name.clone(),
    }
}

fn descriptor(target: &berth_proto::Descriptor) -> Descriptor {
    Descriptor {
        media_type: target.media_type.clone(),
        digest: target.digest.clone(),
        size: target.size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lease resources land in the right set; anything else is ignored.
    #[test]
    fn lease_resources() {
        let cases = [
            ("content/sha256:ab", Some("sha256:ab"), None),
            ("snapshot/node-1/k1", None, Some(("node-1", "k1"))),
            ("snapshot/node-1/a/b", None, Some(("node-1", "a/b"))),
            ("snapshot/node-1", None, None),
            ("other/x", None, None),
        ];
        for (resource, blob, snapshot) in cases {
            let mut roots = Roots::default();
            add_resource(&mut roots, "l1", resource);
            assert_eq!(roots.blobs.first().map(String::as_str), blob, "{resource}");
            let got = roots.node_snapshots.first();
            let got = got.map(|(node, key)| (node.as_str(), key.as_str()));
            assert_eq!(got, snapshot, "{resource}");
        }
    }

    /// A container without an image digest keeps the target of the image it names.
    #[test]
    fn container_falls_back_to_its_image() {
        let target = berth_proto::Descriptor {
            digest: format!("sha256:{}", "a".repeat(64)),
            ..Default::default()
        };
        let ns = mdpb::NamespaceRoots {
            namespace: "default".into(),
            images: vec![mdpb::Image {
                name: "busybox".into(),
                target: Some(target.clone()),
                ..Default::default()
            }],
            containers: vec![mdpb::Container {
                container_id: "c1".into(),
                image: "busybox".into(),
                snapshot_key: "c1-rootfs".into(),
                node: "node-1".into(),
                ..Default::default()
            }],
            leases: vec![],
        };
        let roots = roots(&ns);
        assert_eq!(roots.targets.len(), 2);
        assert!(roots.targets.iter().all(|d| d.digest == target.digest));
        assert_eq!(
            roots.node_snapshots,
            vec![("node-1".into(), "c1-rootfs".into())]
        );
    }

    /// Named roots come in order (images, containers, leases), each image
    /// naming its top chain ID first, and leases keep their blobs as they are.
    #[test]
    fn named_roots_in_order() {
        let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let ns = mdpb::NamespaceRoots {
            namespace: "default".into(),
            images: vec![mdpb::Image {
                name: "busybox".into(),
                target: Some(berth_proto::Descriptor {
                    digest: digest('a'),
                    ..Default::default()
                }),
                config_digest: digest('b'),
                chain_id: digest('c'),
                ..Default::default()
            }],
            containers: vec![mdpb::Container {
                container_id: "c1".into(),
                image_digest: digest('a'),
                snapshot_key: "c1".into(),
                node: "node-1".into(),
                ..Default::default()
            }],
            leases: vec![mdpb::Lease {
                lease_id: "l1".into(),
                resources: vec![format!("content/{}", digest('d')), "other/x".into()],
                ..Default::default()
            }],
        };
        let roots = named_roots(&ns);
        let kinds: Vec<RootKind> = roots.iter().map(|root| root.kind).collect();
        assert_eq!(
            kinds,
            [RootKind::Image, RootKind::Container, RootKind::Lease]
        );
        assert_eq!(
            roots[0].refs,
            vec![
                everywhere(&digest('c')),
                Ref::Blob(Role::Target, Descriptor::of_digest(&digest('a'))),
                Ref::Blob(Role::Config, Descriptor::of_digest(&digest('b'))),
            ]
        );
        assert_eq!(
            roots[1].refs[0],
            Ref::Snapshot {
                node: "node-1".into(),
                key: "c1".into()
            }
        );
        assert_eq!(
            roots[2].refs,
            vec![Ref::Blob(Role::Leaf, Descriptor::of_digest(&digest('d')))]
        );
    }

    /// Explanations carry their kind by node and verdict; an unknown object
    /// has none.
    #[test]
    fn explanations_on_the_wire() {
        let kept = Explanation::new(Some("node-1"), true, Some(vec![]));
        let wire = explanation(&kept);
        assert_eq!(wire.kind(), pb::ObjectKind::Snapshot);
        assert_eq!(wire.verdict(), pb::Verdict::Kept);
        assert_eq!(wire.node, "node-1");

        let blob = explanation(&Explanation::new(None, true, None));
        assert_eq!(blob.kind(), pb::ObjectKind::Blob);
        assert_eq!(blob.verdict(), pb::Verdict::Unreferenced);

        let unknown = explanation(&Explanation::new(None, false, None));
        assert_eq!(unknown.kind(), pb::ObjectKind::Unspecified);
        assert_eq!(unknown.verdict(), pb::Verdict::Unknown);
    }
}
