//! Every refusal of the metadata service, as a named case list.

mod common;

use std::time::Duration;

use anyhow::Result;

use berth_bus::client::new_request_id;
use berth_bus::Code;
use berth_proto::metadata as mpb;
use berth_proto::task::TaskEvent;

use common::{
    code, container, eventually, image, labels, metadata_of, reserve, task, Service, TaskEventOut,
};

/// Every refusal of the service, by name: the code each answers with.
#[tokio::test]
async fn refusals_answer_with_their_codes() -> Result<()> {
    let service = Service::start().await?;
    let md = service.api("r");
    let js = async_nats::jetstream::new(service.conn.clone());

    // What the refusals refer to.
    md.create_image(&mpb::CreateImageRequest {
        image: Some(image("img")),
    })
    .await?;
    md.create_lease(&mpb::CreateLeaseRequest {
        lease: Some(mpb::Lease {
            lease_id: "l1".into(),
            ..Default::default()
        }),
    })
    .await?;
    reserve(&md, "busy", "n1", 5).await?;
    reserve(&md, "done", "n1", 6).await?;
    let exit = TaskEvent {
        container_id: "done".into(),
        exit_status: 1,
        ..Default::default()
    };
    TaskEventOut::new("r", "tasks.exit", 6, exit, "done-exit")
        .publish(&js)
        .await?
        .await?;
    eventually(Duration::from_secs(10), "the exit applied", || async {
        Ok(task(&md, "done")
            .await?
            .is_some_and(|t| t.status == mpb::TaskStatus::Stopped as i32))
    })
    .await?;

    let mut cases: Vec<(&str, Option<Code>, Code)> = Vec::new();
    let invalid = Code::InvalidArgument;

    // Malformed requests.
    let create = |c: mpb::Container| mpb::CreateContainerRequest { container: Some(c) };
    cases.push((
        "container id with a slash",
        code(md.create_container(&create(container("a/b", "n1"))).await),
        invalid,
    ));
    let mut no_target = image("no-target");
    no_target.target = None;
    cases.push((
        "image without a target",
        code(
            md.create_image(&mpb::CreateImageRequest {
                image: Some(no_target),
            })
            .await,
        ),
        invalid,
    ));
    let mut bad_digest = image("bad-digest");
    bad_digest.target.as_mut().unwrap().digest = "sha256:abc".into();
    cases.push((
        "image with a malformed digest",
        code(
            md.create_image(&mpb::CreateImageRequest {
                image: Some(bad_digest),
            })
            .await,
        ),
        invalid,
    ));
    cases.push((
        "image name with a control character",
        code(
            md.create_image(&mpb::CreateImageRequest {
                image: Some(image("a\u{1}b")),
            })
            .await,
        ),
        invalid,
    ));
    let mut bad_spec = container("bad-spec", "n1");
    bad_spec.spec = b"{not json".to_vec().into();
    cases.push((
        "container spec that is not json",
        code(md.create_container(&create(bad_spec)).await),
        invalid,
    ));
    let mut bad_label = container("bad-label", "n1");
    bad_label.labels = labels(&[("", "x")]);
    cases.push((
        "label with an empty key",
        code(md.create_container(&create(bad_label)).await),
        invalid,
    ));
    cases.push((
        "unknown field in an update mask",
        code(
            md.update_image(&mpb::UpdateImageRequest {
                image: Some(image("img")),
                field_mask: vec!["nope".into()],
            })
            .await,
        ),
        invalid,
    ));
    cases.push((
        "fixed field in an update mask",
        code(
            md.update_container(&mpb::UpdateContainerRequest {
                container: Some(container("busy", "n1")),
                field_mask: vec!["runtime".into()],
            })
            .await,
        ),
        invalid,
    ));
    cases.push((
        "fixed field changed by a whole update",
        code(
            md.update_container(&mpb::UpdateContainerRequest {
                container: Some(container("busy", "n2")),
                field_mask: vec![],
            })
            .await,
        ),
        invalid,
    ));
    cases.push((
        "malformed label selector",
        code(
            md.list_images(&mpb::ListImagesRequest {
                selector: vec!["!a=b".into()],
                ..Default::default()
            })
            .await,
        ),
        invalid,
    ));
    cases.push((
        "lease resource of an unknown kind",
        code(
            md.add_lease_resources(&mpb::AddLeaseResourcesRequest {
                lease_id: "l1".into(),
                resources: vec!["image/x".into()],
            })
            .await,
        ),
        invalid,
    ));
    cases.push((
        "reservation without a generation",
        code(
            md.reserve_task(&mpb::ReserveTaskRequest {
                container_id: "busy".into(),
                node: "n1".into(),
                generation: 0,
                boot_id: String::new(),
            })
            .await,
        ),
        invalid,
    ));
    cases.push((
        "namespace op naming another namespace",
        code(
            md.update_namespace(&mpb::UpdateNamespaceRequest {
                namespace: Some(mpb::Namespace {
                    name: "other".into(),
                    ..Default::default()
                }),
                field_mask: vec![],
            })
            .await,
        ),
        invalid,
    ));
    cases.push((
        "reserved namespace named in the body",
        code(
            md.create_namespace(&mpb::CreateNamespaceRequest {
                namespace: Some(mpb::Namespace {
                    name: "events".into(),
                    ..Default::default()
                }),
            })
            .await,
        ),
        invalid,
    ));
    for reserved in ["metadata", "events", "task"] {
        let outcome = metadata_of(&md, reserved)
            .create_namespace(&Default::default())
            .await;
        cases.push(("reserved namespace as the subject", code(outcome), invalid));
    }
    let subject = berth_bus::subject::op("r", "metadata", "images.create")?;
    let request_id = new_request_id();
    let first = mpb::CreateImageRequest {
        image: Some(image("once")),
    };
    let _: mpb::ImageReply = md.client.call_mut(&subject, &first, &request_id).await?;
    let other_body = mpb::CreateImageRequest {
        image: Some(image("twice")),
    };
    let reused = md
        .client
        .call_mut::<_, mpb::ImageReply>(&subject, &other_body, &request_id)
        .await;
    cases.push(("request id reused with another body", code(reused), invalid));

    // Ids that are taken.
    let exists = Code::AlreadyExists;
    cases.push((
        "existing container id",
        code(md.create_container(&create(container("busy", "n1"))).await),
        exists,
    ));
    cases.push((
        "existing image name",
        code(
            md.create_image(&mpb::CreateImageRequest {
                image: Some(image("img")),
            })
            .await,
        ),
        exists,
    ));
    cases.push((
        "existing lease id",
        code(
            md.create_lease(&mpb::CreateLeaseRequest {
                lease: Some(mpb::Lease {
                    lease_id: "l1".into(),
                    ..Default::default()
                }),
            })
            .await,
        ),
        exists,
    ));
    cases.push((
        "existing namespace (made by its first object)",
        code(md.create_namespace(&Default::default()).await),
        exists,
    ));

    // States that do not allow the op.
    let precondition = Code::FailedPrecondition;
    for container_id in ["busy", "done"] {
        let outcome = md
            .delete_container(&mpb::DeleteContainerRequest {
                container_id: container_id.into(),
                ..Default::default()
            })
            .await;
        let case = if container_id == "busy" {
            "delete a container whose task is reserved"
        } else {
            "delete a container whose task has stopped"
        };
        cases.push((case, code(outcome), precondition));
    }
    let reserve_again = |container_id: &str, node: &str, generation| mpb::ReserveTaskRequest {
        container_id: container_id.into(),
        node: node.into(),
        generation,
        boot_id: String::new(),
    };
    cases.push((
        "reserve a task twice",
        code(md.reserve_task(&reserve_again("busy", "n1", 7)).await),
        precondition,
    ));
    cases.push((
        "reserve a stopped task again before its delete",
        code(md.reserve_task(&reserve_again("done", "n1", 8)).await),
        precondition,
    ));
    md.create_container(&create(container("elsewhere", "n2")))
        .await?;
    cases.push((
        "reserve on another node than the container's",
        code(md.reserve_task(&reserve_again("elsewhere", "n1", 9)).await),
        precondition,
    ));
    cases.push((
        "release another generation",
        code(
            md.release_task(&mpb::ReleaseTaskRequest {
                container_id: "busy".into(),
                generation: 99,
            })
            .await,
        ),
        precondition,
    ));
    cases.push((
        "delete a namespace holding objects",
        code(md.delete_namespace(&Default::default()).await),
        precondition,
    ));

    // Records that do not exist.
    let missing = Code::NotFound;
    let gone = mpb::GetImageRequest {
        name: "nope".into(),
    };
    cases.push((
        "get a missing image",
        code(md.get_image(&gone).await),
        missing,
    ));
    let gone = mpb::GetContainerRequest {
        container_id: "nope".into(),
    };
    cases.push((
        "get a missing container",
        code(md.get_container(&gone).await),
        missing,
    ));
    let gone = mpb::GetLeaseRequest {
        lease_id: "nope".into(),
    };
    cases.push((
        "get a missing lease",
        code(md.get_lease(&gone).await),
        missing,
    ));
    let gone = mpb::GetTaskRequest {
        container_id: "nope".into(),
    };
    cases.push((
        "get a missing task",
        code(md.get_task(&gone).await),
        missing,
    ));
    cases.push((
        "get a namespace never written to",
        code(
            metadata_of(&md, "never")
                .get_namespace(&Default::default())
                .await,
        ),
        missing,
    ));
    cases.push((
        "update a missing image",
        code(
            md.update_image(&mpb::UpdateImageRequest {
                image: Some(image("nope")),
                field_mask: vec![],
            })
            .await,
        ),
        missing,
    ));
    cases.push((
        "delete a missing lease",
        code(
            md.delete_lease(&mpb::DeleteLeaseRequest {
                lease_id: "nope".into(),
            })
            .await,
        ),
        missing,
    ));
    cases.push((
        "reserve for a missing container",
        code(md.reserve_task(&reserve_again("nope", "n1", 1)).await),
        missing,
    ));

    let failed: Vec<_> = cases
        .iter()
        .filter(|(_, got, want)| *got != Some(*want))
        .collect();
    assert!(failed.is_empty(), "unexpected outcomes: {failed:#?}");
    service.stop().await
}
