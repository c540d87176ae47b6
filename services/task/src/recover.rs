//! Start-up: re-adopting the tasks this node had.
//!
//! Every record without an exit gets its watcher again: a live shim answers
//! `wait` at once if the init exited while the service was down, a dead one
//! leaves its exit record or `runc state`. Tasks of an earlier boot cannot
//! have survived it, so they are recorded as exited with an unknown status.
//! Exits recorded but not yet applied by metadata are watched until they are.

use std::sync::Arc;

use berth_proto::Timestamp;

use crate::monitor::{self, UNKNOWN_EXIT};
use crate::store::Exit;
use crate::TaskService;

/// Re-adopts every task in the store; returns once each has its watcher.
pub async fn recover(svc: &Arc<TaskService>) -> berth_bus::Result<()> {
    let records = {
        let txn = svc.store.env.read_txn()?;
        svc.store.all(&txn)?
    };
    let mut adopted = 0;
    for (namespace, container_id, record) in records {
        if record.exit.is_some() && record.exit_acked {
            continue;
        }
        if record.exit.is_none() && record.boot_id != svc.boot_id {
            let exit = Exit {
                status: UNKNOWN_EXIT,
                exited_at: Timestamp::now().unix_nanos,
            };
            monitor::record_exit(svc, &namespace, &container_id, record.generation, exit).await;
            let mut record = record.clone();
            record.exit = Some(exit);
            monitor::watch(svc.clone(), namespace, container_id, record);
            continue;
        }
        for (exec_id, exec) in &record.execs {
            if exec.exit.is_none() {
                crate::handlers::watch_exec(
                    svc.clone(),
                    &namespace,
                    &container_id,
                    &record,
                    exec_id,
                );
            }
        }
        monitor::watch(svc.clone(), namespace, container_id, record);
        adopted += 1;
    }
    tracing::info!(adopted, "tasks re-adopted");
    Ok(())
}
