//! Racing changes of the same records, against a real nats-server.

mod common;

use std::time::Duration;

use anyhow::Result;

use berth_bus::Code;
use berth_proto::metadata as mpb;

use common::{container, image, metadata_of, task, Service};

/// Sixteen creates of the same id at once, for every kind: exactly one
/// wins, and every other answers already-exists.
#[tokio::test]
async fn racing_creates_have_exactly_one_winner() -> Result<()> {
    let service = Service::start().await?;
    let md = service.api("race");

    for kind in ["container", "image", "lease", "namespace"] {
        let attempts = (0..16).map(|_| {
            let md = md.clone();
            async move {
                match kind {
                    "container" => md
                        .create_container(&mpb::CreateContainerRequest {
                            container: Some(container("c1", "n1")),
                        })
                        .await
                        .map(drop),
                    "image" => md
                        .create_image(&mpb::CreateImageRequest {
                            image: Some(image("docker.io/library/x:1")),
                        })
                        .await
                        .map(drop),
                    "lease" => md
                        .create_lease(&mpb::CreateLeaseRequest {
                            lease: Some(mpb::Lease {
                                lease_id: "l1".into(),
                                ..Default::default()
                            }),
                        })
                        .await
                        .map(drop),
                    _ => metadata_of(&md, "race-ns")
                        .create_namespace(&Default::default())
                        .await
                        .map(drop),
                }
            }
        });
        let outcomes = futures::future::join_all(attempts).await;
        let won = outcomes.iter().filter(|o| o.is_ok()).count();
        let lost = outcomes
            .iter()
            .filter(|o| matches!(o, Err(err) if err.code == Code::AlreadyExists))
            .count();
        assert_eq!((won, lost), (1, 15), "{kind}: {outcomes:?}");
    }
    service.stop().await
}

/// A container delete and a task reservation racing on the same container
/// never both succeed: exactly one does, and the records agree with it.
#[tokio::test]
async fn a_delete_racing_a_reservation_never_lets_both_succeed() -> Result<()> {
    let service = Service::start().await?;
    let md = service.api("race");
    let count = 64;
    for n in 0..count {
        md.create_container(&mpb::CreateContainerRequest {
            container: Some(container(&format!("c{n}"), "n1")),
        })
        .await?;
    }

    // The two sides come over two connections.
    let deleter = common::metadata(
        &berth_bus::connect(&service.nats.url(), "deleter").await?,
        "race",
    );
    let reserver = common::metadata(
        &berth_bus::connect(&service.nats.url(), "reserver").await?,
        "race",
    );
    let races = (0..count).map(|n| {
        let (deleter, reserver) = (deleter.clone(), reserver.clone());
        async move {
            let container_id = format!("c{n}");
            let delete = mpb::DeleteContainerRequest {
                container_id: container_id.clone(),
                ..Default::default()
            };
            let reserve = mpb::ReserveTaskRequest {
                container_id: container_id.clone(),
                node: "n1".into(),
                generation: 1 + n as u64,
                boot_id: String::new(),
            };
            // A head start of a millisecond for one side in half of the
            // races; the other half go out together.
            let head_start = |side: u64| async move {
                if n as u64 % 4 == side {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            let delete = async {
                head_start(1).await;
                deleter.delete_container(&delete).await
            };
            let reserve = async {
                head_start(2).await;
                reserver.reserve_task(&reserve).await
            };
            let (deleted, reserved) = tokio::join!(delete, reserve);
            (container_id, deleted, reserved)
        }
    });
    let mut deletes_won = 0;
    let mut reserves_won = 0;
    // One race at a time, so neither side's queue decides them all.
    let mut outcomes = Vec::new();
    for race in races {
        outcomes.push(race.await);
    }
    for (container_id, deleted, reserved) in outcomes {
        match (&deleted, &reserved) {
            (Ok(_), Err(err)) => {
                assert_eq!(err.code, Code::NotFound, "{container_id}");
                assert!(task(&md, &container_id).await?.is_none());
                deletes_won += 1;
            }
            (Err(err), Ok(_)) => {
                assert_eq!(err.code, Code::FailedPrecondition, "{container_id}");
                let get = mpb::GetContainerRequest {
                    container_id: container_id.clone(),
                };
                md.get_container(&get).await?;
                reserves_won += 1;
            }
            other => panic!("{container_id}: both or neither succeeded: {other:?}"),
        }
    }
    assert_eq!(deletes_won + reserves_won, count);
    assert!(
        deletes_won > 0 && reserves_won > 0,
        "one side won every race"
    );
    eprintln!("deletes won {deletes_won}, reservations {reserves_won}");
    service.stop().await
}
