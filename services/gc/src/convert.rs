//! From metadata's wire roots to the domain [`Roots`] that mark walks.

use berth_proto::metadata as mdpb;

use crate::mark::{Descriptor, Roots};

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
        if !container.image_digest.is_empty() {
            roots
                .targets
                .push(Descriptor::of_digest(&container.image_digest));
        } else if let Some(target) = ns
            .images
            .iter()
            .find(|image| image.name == container.image)
            .and_then(|image| image.target.as_ref())
        {
            roots.targets.push(descriptor(target));
        }
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

/// Adds one lease resource: `content/<digest>` or `snapshot/<node>/<key>`.
fn add_resource(roots: &mut Roots, lease_id: &str, resource: &str) {
    if let Some(digest) = resource.strip_prefix("content/") {
        roots.blobs.push(digest.to_string());
    } else if let Some((node, key)) = resource
        .strip_prefix("snapshot/")
        .and_then(|rest| rest.split_once('/'))
    {
        roots
            .node_snapshots
            .push((node.to_string(), key.to_string()));
    } else {
        tracing::debug!(lease_id, resource, "unknown lease resource ignored");
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
}
