//! Updates, selectors, namespaces and leases over NATS, against a real
//! nats-server.

mod common;

use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use prost::Message;

use berth_bus::Code;
use berth_proto::metadata as mpb;
use berth_proto::{Envelope, Timestamp};

use common::{code, container, digest, image, labels, Service};

/// Updates change exactly the masked fields (single labels included) and
/// bump the generation; lists select by labels for every kind.
#[tokio::test]
async fn updates_follow_their_masks_and_lists_their_selectors() -> Result<()> {
    let service = Service::start().await?;
    let md = service.api("m");

    // Images: one label set, one removed, the rest untouched.
    let mut record = image("img");
    record.labels = labels(&[("keep", "1"), ("drop", "2")]);
    md.create_image(&mpb::CreateImageRequest {
        image: Some(record),
    })
    .await?;
    let mut change = image("img");
    change.target.as_mut().unwrap().digest = digest('f');
    change.labels = labels(&[("new", "3")]);
    let updated = md
        .update_image(&mpb::UpdateImageRequest {
            image: Some(change),
            field_mask: vec!["labels.new".into(), "labels.drop".into()],
        })
        .await?
        .image
        .unwrap();
    assert_eq!(updated.labels, labels(&[("keep", "1"), ("new", "3")]));
    assert_eq!(
        updated.target.unwrap().digest,
        digest('a'),
        "target not masked"
    );
    assert_eq!(updated.generation, 2);

    // Containers: a masked field changes, the others and the fixed ones stay.
    let mut record = container("c1", "n1");
    record.stop_signal = "SIGTERM".into();
    record.labels = labels(&[("app", "web")]);
    md.create_container(&mpb::CreateContainerRequest {
        container: Some(record),
    })
    .await?;
    let mut change = container("c1", "n1");
    change.stop_signal = "SIGINT".into();
    change.spec = br#"{"ociVersion":"1.2.0"}"#.to_vec().into();
    let updated = md
        .update_container(&mpb::UpdateContainerRequest {
            container: Some(change),
            field_mask: vec!["stop_signal".into()],
        })
        .await?
        .container
        .unwrap();
    assert_eq!(updated.stop_signal, "SIGINT");
    assert!(updated.spec.is_empty(), "spec not masked");
    assert_eq!(updated.labels, labels(&[("app", "web")]));
    assert_eq!(updated.runtime, "io.berth.runc.v1");
    assert_eq!(updated.generation, 2);

    // Leases: expiry and labels, resources through add and remove.
    let lease = md
        .create_lease(&mpb::CreateLeaseRequest {
            lease: Some(mpb::Lease {
                lease_id: "l1".into(),
                labels: labels(&[("purpose", "import")]),
                ..Default::default()
            }),
        })
        .await?
        .lease
        .unwrap();
    assert_eq!(lease.generation, 1);
    let later = Timestamp {
        unix_nanos: Timestamp::now().unix_nanos + 3_600_000_000_000,
    };
    let updated = md
        .update_lease(&mpb::UpdateLeaseRequest {
            lease: Some(mpb::Lease {
                lease_id: "l1".into(),
                expires_at: Some(later),
                ..Default::default()
            }),
            field_mask: vec!["expires_at".into()],
        })
        .await?
        .lease
        .unwrap();
    assert_eq!(updated.expires_at, Some(later));
    assert_eq!(updated.labels, labels(&[("purpose", "import")]));
    let blob = format!("content/{}", digest('d'));
    let added = md
        .add_lease_resources(&mpb::AddLeaseResourcesRequest {
            lease_id: "l1".into(),
            resources: vec![blob.clone(), "snapshot/n1/k1".into(), blob.clone()],
        })
        .await?
        .lease
        .unwrap();
    assert_eq!(
        added.resources,
        [blob.clone(), "snapshot/n1/k1".to_string()]
    );
    let removed = md
        .remove_lease_resources(&mpb::RemoveLeaseResourcesRequest {
            lease_id: "l1".into(),
            resources: vec!["snapshot/n1/k1".into()],
        })
        .await?
        .lease
        .unwrap();
    assert_eq!(removed.resources, [blob]);
    assert_eq!(removed.generation, 4);

    // Selectors, for every kind.
    for (name, app) in [("web-1", "web"), ("db-1", "db"), ("bare", "")] {
        let mut record = container(name, "n1");
        let mut img = image(name);
        let mut lease = mpb::Lease {
            lease_id: name.into(),
            ..Default::default()
        };
        if !app.is_empty() {
            record.labels = labels(&[("app", app)]);
            img.labels = labels(&[("app", app)]);
            lease.labels = labels(&[("app", app)]);
        }
        md.create_container(&mpb::CreateContainerRequest {
            container: Some(record),
        })
        .await?;
        md.create_image(&mpb::CreateImageRequest { image: Some(img) })
            .await?;
        md.create_lease(&mpb::CreateLeaseRequest { lease: Some(lease) })
            .await?;
    }
    let terms = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases: &[(&[&str], &[&str])] = &[
        (&["app=web"], &["web-1"]),
        (&["app!=web", "!purpose"], &["bare", "db-1"]),
        (&["app"], &["db-1", "web-1"]),
    ];
    for (selector, want) in cases {
        let containers: Vec<_> = md
            .list_containers(&mpb::ListContainersRequest {
                selector: terms(selector),
                ..Default::default()
            })
            .await?
            .containers
            .into_iter()
            .map(|c| c.container_id)
            .filter(|id| id != "c1")
            .collect();
        assert_eq!(containers, *want, "containers {selector:?}");
        let images: Vec<_> = md
            .list_images(&mpb::ListImagesRequest {
                selector: terms(selector),
                ..Default::default()
            })
            .await?
            .images
            .into_iter()
            .map(|i| i.name)
            .filter(|name| name != "img")
            .collect();
        assert_eq!(images, *want, "images {selector:?}");
        let leases: Vec<_> = md
            .query_leases(&mpb::QueryLeasesRequest {
                selector: terms(selector),
                ..Default::default()
            })
            .await?
            .leases
            .into_iter()
            .map(|l| l.lease_id)
            .filter(|id| id != "l1")
            .collect();
        assert_eq!(leases, *want, "leases {selector:?}");
    }
    let exact = md
        .list_images(&mpb::ListImagesRequest {
            label_selector: labels(&[("app", "db")]),
            ..Default::default()
        })
        .await?;
    assert_eq!(exact.images.len(), 1);

    service.stop().await
}

/// A namespace is made by its first object or by `namespaces.create`,
/// carries labels, refuses deletion while it holds objects, and publishes
/// its changes; after deletion gc's mark still covers it.
#[tokio::test]
async fn namespaces_are_objects_with_a_lifecycle() -> Result<()> {
    let service = Service::start().await?;
    let events_subject = format!("{}.*.events.namespaces.>", berth_bus::subject::PREFIX);
    let mut events = service.conn.subscribe(events_subject).await?;

    // Made by its first object.
    let auto = service.api("auto");
    auto.create_image(&mpb::CreateImageRequest {
        image: Some(image("x")),
    })
    .await?;
    let record = auto
        .get_namespace(&Default::default())
        .await?
        .namespace
        .unwrap();
    assert_eq!((record.name.as_str(), record.generation), ("auto", 1));

    // Made on purpose, with labels, changed, listed by them.
    let team = service.api("team");
    team.create_namespace(&mpb::CreateNamespaceRequest {
        namespace: Some(mpb::Namespace {
            labels: labels(&[("owner", "ops")]),
            ..Default::default()
        }),
    })
    .await?;
    let updated = team
        .update_namespace(&mpb::UpdateNamespaceRequest {
            namespace: Some(mpb::Namespace {
                labels: labels(&[("tier", "gold")]),
                ..Default::default()
            }),
            field_mask: vec!["labels.tier".into()],
        })
        .await?
        .namespace
        .unwrap();
    assert_eq!(
        updated.labels,
        labels(&[("owner", "ops"), ("tier", "gold")])
    );
    let listed: Vec<_> = team
        .list_namespaces(&mpb::ListNamespacesRequest {
            selector: vec!["tier=gold".into()],
            ..Default::default()
        })
        .await?
        .namespaces
        .into_iter()
        .map(|ns| ns.name)
        .collect();
    assert_eq!(listed, ["team"]);
    let all = team.list_namespaces(&Default::default()).await?.namespaces;
    assert_eq!(all.len(), 2);

    // Refused while it holds an image; removed once it holds nothing.
    let refused = auto.delete_namespace(&Default::default()).await;
    assert_eq!(code(refused), Some(Code::FailedPrecondition));
    auto.delete_image(&mpb::DeleteImageRequest { name: "x".into() })
        .await?;
    auto.delete_namespace(&Default::default()).await?;
    let gone = auto.get_namespace(&Default::default()).await;
    assert_eq!(code(gone), Some(Code::NotFound));

    // gc still sees it, so what its content and snapshots held is collected.
    let mark = team.mark(&mpb::MarkRequest {}).await?;
    let marked: Vec<_> = mark
        .namespaces
        .iter()
        .map(|ns| ns.namespace.as_str())
        .collect();
    assert_eq!(marked, ["auto", "team"]);

    // Every change was published, in order per namespace.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let message = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await?
            .expect("subscription ended");
        let envelope = Envelope::decode(message.payload)?;
        seen.push(format!("{} {}", envelope.namespace, envelope.topic));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "auto namespaces.create",
            "auto namespaces.delete",
            "team namespaces.create",
            "team namespaces.update",
        ]
    );
    service.stop().await
}

/// A lease whose expiry passes is removed and publishes `leases.expire`,
/// also when the expiry was set by an update; a lease without one stays.
#[tokio::test]
async fn expired_leases_are_removed_and_publish_leases_expire() -> Result<()> {
    let service = Service::start().await?;
    let md = service.api("exp");
    let subject = berth_bus::subject::event("exp", "leases.expire")?;
    let mut expired = service.conn.subscribe(subject).await?;
    let soon = |millis: i64| Timestamp {
        unix_nanos: Timestamp::now().unix_nanos + millis * 1_000_000,
    };

    for lease_id in ["short", "moved", "forever"] {
        let expires_at = (lease_id == "short").then(|| soon(1200));
        md.create_lease(&mpb::CreateLeaseRequest {
            lease: Some(mpb::Lease {
                lease_id: lease_id.into(),
                expires_at,
                ..Default::default()
            }),
        })
        .await?;
    }
    md.update_lease(&mpb::UpdateLeaseRequest {
        lease: Some(mpb::Lease {
            lease_id: "moved".into(),
            expires_at: Some(soon(800)),
            ..Default::default()
        }),
        field_mask: vec!["expires_at".into()],
    })
    .await?;

    let mut gone = Vec::new();
    while gone.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), expired.next())
            .await?
            .expect("subscription ended");
        let envelope = Envelope::decode(message.payload)?;
        assert_eq!(envelope.topic, "leases.expire");
        let event = mpb::LeaseEvent::decode(envelope.payload)?;
        gone.push(event.lease_id);
    }
    assert_eq!(gone, ["moved", "short"], "soonest first");

    for (lease_id, present) in [("short", false), ("moved", false), ("forever", true)] {
        let found = md
            .get_lease(&mpb::GetLeaseRequest {
                lease_id: lease_id.into(),
            })
            .await;
        assert_eq!(found.is_ok(), present, "{lease_id}: {found:?}");
    }
    service.stop().await
}
