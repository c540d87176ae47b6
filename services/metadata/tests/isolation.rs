//! Namespace isolation over NATS, against a real nats-server.

mod common;

use std::time::Duration;

use anyhow::Result;

use berth_bus::Code;
use berth_proto::metadata as mpb;
use berth_proto::task::TaskEvent;

use common::{code, digest, eventually, image, reserve, task, Service, TaskEventOut};

/// Nothing of namespace `a` is visible or changeable from `b` (nor from
/// `ab`, whose key prefix starts like `a`'s), and a task event published in
/// `b` that names `a` in its envelope does not touch `a`'s records.
#[tokio::test]
async fn namespaces_are_isolated() -> Result<()> {
    let service = Service::start().await?;
    let a = service.api("a");
    let b = service.api("b");
    let ab = service.api("ab");

    a.create_image(&mpb::CreateImageRequest {
        image: Some(image("x")),
    })
    .await?;
    reserve(&a, "c", "n1", 11).await?;
    a.create_lease(&mpb::CreateLeaseRequest {
        lease: Some(mpb::Lease {
            lease_id: "l".into(),
            ..Default::default()
        }),
    })
    .await?;
    ab.create_image(&mpb::CreateImageRequest {
        image: Some(image("y")),
    })
    .await?;

    // Reads from `b` see nothing of `a`.
    let get_image = mpb::GetImageRequest { name: "x".into() };
    let get_container = mpb::GetContainerRequest {
        container_id: "c".into(),
    };
    let lease = mpb::GetLeaseRequest {
        lease_id: "l".into(),
    };
    assert_eq!(code(b.get_image(&get_image).await), Some(Code::NotFound));
    assert_eq!(
        code(b.get_container(&get_container).await),
        Some(Code::NotFound)
    );
    assert_eq!(code(b.get_lease(&lease).await), Some(Code::NotFound));
    assert!(task(&b, "c").await?.is_none());
    assert!(b.list_images(&Default::default()).await?.images.is_empty());
    assert!(b
        .list_containers(&Default::default())
        .await?
        .containers
        .is_empty());
    assert!(b.list_leases(&Default::default()).await?.leases.is_empty());
    assert!(b.list_tasks(&Default::default()).await?.tasks.is_empty());

    // Nor does `ab`, and `a` does not see `ab`'s image.
    let names: Vec<_> = a
        .list_images(&Default::default())
        .await?
        .images
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["x"]);
    assert_eq!(code(ab.get_image(&get_image).await), Some(Code::NotFound));

    // Changes from `b` reach nothing of `a`.
    let delete = mpb::DeleteContainerRequest {
        container_id: "c".into(),
        ..Default::default()
    };
    assert_eq!(
        code(b.delete_container(&delete).await),
        Some(Code::NotFound)
    );
    let update = mpb::UpdateImageRequest {
        image: Some(image("x")),
        field_mask: vec!["labels".into()],
    };
    assert_eq!(code(b.update_image(&update).await), Some(Code::NotFound));
    let delete_lease = mpb::DeleteLeaseRequest {
        lease_id: "l".into(),
    };
    assert_eq!(
        code(b.delete_lease(&delete_lease).await),
        Some(Code::NotFound)
    );
    b.release_task(&mpb::ReleaseTaskRequest {
        container_id: "c".into(),
        generation: 11,
    })
    .await?;
    assert!(
        task(&a, "c").await?.is_some(),
        "a release in b freed a's task"
    );
    let other = mpb::GetNamespaceRequest { name: "a".into() };
    assert_eq!(
        code(b.get_namespace(&other).await),
        Some(Code::InvalidArgument)
    );
    let other = mpb::DeleteNamespaceRequest { name: "a".into() };
    assert_eq!(
        code(b.delete_namespace(&other).await),
        Some(Code::InvalidArgument)
    );

    // The same name in `b` is another record.
    let mut own = image("x");
    own.target.as_mut().unwrap().digest = digest('c');
    b.create_image(&mpb::CreateImageRequest { image: Some(own) })
        .await?;
    let theirs = a.get_image(&get_image).await?.image.unwrap();
    assert_eq!(theirs.target.unwrap().digest, digest('a'));

    // A forged event: published in `b`, naming `a` and a's reservation.
    // A real event of `b` after it shows the consumer has passed it.
    reserve(&b, "mine", "n1", 3).await?;
    let js = async_nats::jetstream::new(service.conn.clone());
    let mut forged = TaskEventOut::new("b", "tasks.start", 11, start_event("c", 66), "forged");
    forged.envelope_namespace = "a".into();
    forged.publish(&js).await?.await?;
    TaskEventOut::new("b", "tasks.start", 3, start_event("mine", 7), "real")
        .publish(&js)
        .await?
        .await?;
    eventually(Duration::from_secs(10), "b's event applied", || async {
        Ok(task(&b, "mine").await?.is_some_and(|t| t.pid == 7))
    })
    .await?;
    let untouched = task(&a, "c").await?.unwrap();
    assert_eq!(untouched.status, mpb::TaskStatus::Created as i32);
    assert_eq!(untouched.pid, 0);

    service.stop().await
}

fn start_event(container_id: &str, pid: u32) -> TaskEvent {
    TaskEvent {
        container_id: container_id.to_string(),
        pid,
        ..Default::default()
    }
}
