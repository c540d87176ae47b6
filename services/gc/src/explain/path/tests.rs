//! Path finding over a small graph of two images sharing a base layer.

use super::*;

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn words(path: &[Step]) -> String {
    Path(path).to_string()
}

fn image(name: &str, manifest: &str, chain_id: &str) -> Root {
    Root {
        kind: RootKind::Image,
        name: name.into(),
        refs: vec![
            Ref::Snapshot {
                node: String::new(),
                key: chain_id.into(),
            },
            Ref::Blob(Role::Target, Descriptor::of_digest(manifest)),
        ],
    }
}

/// A graph of two images sharing a base layer: `m1` (config `c1`,
/// layer `l1`, chain `s1`) and `m2` (config `c2`, layers `l1` `l2`,
/// chains `s1` `s2`), and an index `i` of `m1`.
fn graph() -> Graph {
    let mut graph = Graph::new();
    let manifest = |config: char, layers: &[char]| Node::Manifest {
        config: Descriptor {
            media_type: media_type::OCI_CONFIG.into(),
            ..Descriptor::of_digest(&digest(config))
        },
        layers: layers
            .iter()
            .map(|l| Descriptor::of_digest(&digest(*l)))
            .collect(),
    };
    graph.insert(Role::Target, &digest('1'), manifest('c', &['a']));
    graph.insert(Role::Target, &digest('2'), manifest('d', &['a', 'b']));
    let s1 = digest('e');
    graph.insert(Role::Config, &digest('c'), Node::Config(vec![s1.clone()]));
    graph.insert(
        Role::Config,
        &digest('d'),
        Node::Config(vec![s1, digest('f')]),
    );
    let child = Descriptor {
        media_type: media_type::OCI_MANIFEST.into(),
        ..Descriptor::of_digest(&digest('1'))
    };
    graph.insert(Role::Target, &digest('9'), Node::Index(vec![child]));
    graph
}

fn no_parents() -> HashMap<String, String> {
    HashMap::new()
}

/// A layer is reached from its image through the manifest.
#[test]
fn layer_through_its_manifest() {
    let roots = [image("busybox", &digest('1'), &digest('e'))];
    let path = find(&roots, &graph(), &no_parents(), Object::Blob(&digest('a')));
    let expected = format!(
        "image busybox -> manifest {} -> layer {}",
        digest('1'),
        digest('a')
    );
    assert_eq!(words(&path.unwrap()), expected);
}

/// A config is reached as a config, and an index's manifest through it.
#[test]
fn config_through_an_index() {
    let roots = [Root {
        kind: RootKind::Image,
        name: "multi".into(),
        refs: vec![Ref::Blob(Role::Target, Descriptor::of_digest(&digest('9')))],
    }];
    let path = find(&roots, &graph(), &no_parents(), Object::Blob(&digest('c'))).unwrap();
    let kinds: Vec<StepKind> = path.iter().map(|step| step.kind).collect();
    assert_eq!(
        kinds,
        [
            StepKind::Image,
            StepKind::Index,
            StepKind::Manifest,
            StepKind::Config
        ]
    );
}

/// A shared layer is explained by the first root that reaches it, and
/// the second image's own layer by the second image.
#[test]
fn shared_layer_names_the_first_image() {
    let roots = [
        image("busybox", &digest('1'), &digest('e')),
        image("layers", &digest('2'), &digest('f')),
    ];
    let graph = graph();
    let shared = find(&roots, &graph, &no_parents(), Object::Blob(&digest('a'))).unwrap();
    assert_eq!(shared[0], Step::new(StepKind::Image, "busybox"));
    let own = find(&roots, &graph, &no_parents(), Object::Blob(&digest('b'))).unwrap();
    assert_eq!(own[0], Step::new(StepKind::Image, "layers"));
    assert_eq!(own.len(), 3);
}

/// A container's snapshot is kept on its node only, and its parent
/// through it.
#[test]
fn container_snapshot_and_parent_on_its_node() {
    let roots = [Root {
        kind: RootKind::Container,
        name: "c1".into(),
        refs: vec![Ref::Snapshot {
            node: "node-1".into(),
            key: "c1".into(),
        }],
    }];
    let parents: HashMap<String, String> = [("c1".to_string(), digest('e'))].into();
    let base = digest('e');
    let on = |node| Object::Snapshot { node, key: &base };
    let path = find(&roots, &Graph::new(), &parents, on("node-1")).unwrap();
    assert_eq!(
        words(&path),
        format!("container c1 -> snapshot c1 -> parent {base}")
    );
    assert_eq!(find(&roots, &Graph::new(), &parents, on("node-2")), None);
}

/// An image keeps its chain IDs on every node: the top one directly,
/// the ones below through parents or the config.
#[test]
fn image_chain_ids_everywhere() {
    let roots = [Root {
        kind: RootKind::Image,
        name: "layers".into(),
        refs: vec![Ref::Blob(Role::Target, Descriptor::of_digest(&digest('2')))],
    }];
    let object = Object::Snapshot {
        node: "any",
        key: &digest('e'),
    };
    let path = find(&roots, &graph(), &no_parents(), object).unwrap();
    let kinds: Vec<StepKind> = path.iter().map(|step| step.kind).collect();
    let expected = [
        StepKind::Image,
        StepKind::Manifest,
        StepKind::Config,
        StepKind::Snapshot,
    ];
    assert_eq!(kinds, expected);

    // With the top chain ID as a root, the parent walk is shorter.
    let roots = [image("layers", &digest('2'), &digest('f'))];
    let parents: HashMap<String, String> = [(digest('f'), digest('e'))].into();
    let path = find(&roots, &graph(), &parents, object).unwrap();
    assert_eq!(
        words(&path),
        format!(
            "image layers -> snapshot {} -> parent {}",
            digest('f'),
            digest('e')
        )
    );
}

/// A lease keeps its blob as it is, and its snapshot on its node.
#[test]
fn leased_blob_and_snapshot() {
    let roots = [Root {
        kind: RootKind::Lease,
        name: "import-1".into(),
        refs: vec![
            Ref::Blob(Role::Leaf, Descriptor::of_digest(&digest('7'))),
            Ref::Snapshot {
                node: "node-1".into(),
                key: "k".into(),
            },
        ],
    }];
    let blob = find(&roots, &graph(), &no_parents(), Object::Blob(&digest('7'))).unwrap();
    assert_eq!(
        words(&blob),
        format!("lease import-1 -> blob {}", digest('7'))
    );
    let object = Object::Snapshot {
        node: "node-1",
        key: "k",
    };
    let snapshot = find(&roots, &graph(), &no_parents(), object).unwrap();
    assert_eq!(words(&snapshot), "lease import-1 -> snapshot k");
}

/// Nothing reaches what no root refers to, a blob asked about is never
/// matched by a snapshot of the same name, and malformed digests lead
/// nowhere.
#[test]
fn unreached() {
    let roots = [
        image("busybox", &digest('1'), &digest('e')),
        Root {
            kind: RootKind::Lease,
            name: "l".into(),
            refs: vec![Ref::Blob(Role::Leaf, Descriptor::of_digest("sha256:short"))],
        },
    ];
    let graph = graph();
    assert_eq!(
        find(&roots, &graph, &no_parents(), Object::Blob(&digest('b'))),
        None
    );
    assert_eq!(
        find(&roots, &graph, &no_parents(), Object::Blob(&digest('e'))),
        None
    );
    assert_eq!(
        find(&roots, &graph, &no_parents(), Object::Blob("sha256:short")),
        None
    );
    assert_eq!(
        find(&[], &graph, &no_parents(), Object::Blob(&digest('a'))),
        None
    );
}

/// A parent cycle (which the snapshot service never makes) ends the walk.
#[test]
fn parent_cycle_ends() {
    let roots = [Root {
        kind: RootKind::Container,
        name: "c".into(),
        refs: vec![Ref::Snapshot {
            node: String::new(),
            key: "a".into(),
        }],
    }];
    let parents: HashMap<String, String> = [
        ("a".to_string(), "b".to_string()),
        ("b".to_string(), "a".to_string()),
    ]
    .into();
    let object = Object::Snapshot {
        node: "n",
        key: "z",
    };
    assert_eq!(find(&roots, &Graph::new(), &parents, object), None);
}

/// Verdicts and their words, by what is stored and what is reached.
#[test]
fn verdicts_and_reasons() {
    let path = vec![
        Step::new(StepKind::Container, "c1"),
        Step::new(StepKind::Snapshot, "c1"),
    ];
    let cases = [
        (
            Explanation::new(Some("n1"), true, Some(path.clone())),
            Verdict::Kept,
            "kept on node n1: container c1 -> snapshot c1",
        ),
        (
            Explanation::new(None, true, None),
            Verdict::Unreferenced,
            "unreferenced: goes at the next run unless reused before it",
        ),
        (
            Explanation::new(Some("n1"), false, Some(path)),
            Verdict::Missing,
            "referenced on node n1 but not stored: container c1 -> snapshot c1",
        ),
        (
            Explanation::new(None, false, None),
            Verdict::Unknown,
            "unknown: no root reaches it and it is not stored",
        ),
    ];
    for (explanation, verdict, reason) in cases {
        assert_eq!(explanation.verdict, verdict);
        assert_eq!(explanation.reason(), reason);
    }
}
