//! Task events applied to task records, and the reconcile that replaces them
//! when the event stream cannot be trusted.
//!
//! A task record is made by `tasks.reserve` and removed by `tasks.release`;
//! events only move its state. An event applies only to the reservation of
//! its generation, and only once: the record keeps the stream sequence it
//! last applied (`event_version`), and the consumer's cursor is stored in the
//! same transaction as the records a batch changed. So a duplicate, a
//! redelivery after a crash, or an event of a released or replaced
//! reservation changes nothing.
//!
//! Within one reservation the states only move forward (created, running,
//! stopped), except that pause and resume alternate; an event that would
//! move backwards (a `tasks.start` after the exit) is a no-op.
//!
//! Limitation: events carry no count of their own within a reservation, so
//! a pause and resume republished by a task service past the stream's
//! duplicate window are applied again in their order: the record passes
//! through the old state and ends right.

use std::collections::HashMap;

use heed::RwTxn;
use prost::Message;

use berth_bus::events::{Cursor, Delivered};
use berth_proto::metadata::{Task, TaskStatus};
use berth_proto::task::{State, TaskEvent};
use berth_proto::Timestamp;

use crate::error::Result;
use crate::events::task as topic;
use crate::schema::Schema;

/// What one event does to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The record changed.
    Changed,
    /// The task is gone on its node: the record goes.
    Removed,
    /// Nothing (a duplicate, a late event, a topic of exec processes).
    Unchanged,
}

/// The state's name as people read it.
pub fn status_name(status: i32) -> &'static str {
    match TaskStatus::try_from(status).unwrap_or(TaskStatus::Unspecified) {
        TaskStatus::Created => "created",
        TaskStatus::Running => "running",
        TaskStatus::Paused => "paused",
        TaskStatus::Stopped => "stopped",
        TaskStatus::Unknown => "unknown",
        TaskStatus::Unspecified => "unspecified",
    }
}

/// Applies one event of the record's own reservation to the record.
pub fn apply_event(task: &mut Task, topic: &str, event: &TaskEvent) -> Effect {
    // Exec processes have topics of their own; an init topic that names one
    // is not about the init.
    if !event.exec_id.is_empty() {
        return Effect::Unchanged;
    }
    let status = TaskStatus::try_from(task.status).unwrap_or(TaskStatus::Unspecified);
    match (topic, status) {
        (topic::CREATE, TaskStatus::Created) => {
            task.pid = event.pid;
            task.pid_start_time = event.pid_start_time;
            if !event.boot_id.is_empty() {
                task.boot_id = event.boot_id.clone();
            }
        }
        (topic::START, TaskStatus::Created | TaskStatus::Unknown) => {
            task.status = TaskStatus::Running as i32;
            task.pid = event.pid;
            task.pid_start_time = event.pid_start_time;
        }
        (topic::EXIT, status) if status != TaskStatus::Stopped => {
            task.status = TaskStatus::Stopped as i32;
            task.exit_status = event.exit_status;
            task.exited_at = event.exited_at;
            task.oom_killed |= event.oom_killed;
        }
        (topic::PAUSED, TaskStatus::Running) => task.status = TaskStatus::Paused as i32,
        (topic::RESUMED, TaskStatus::Paused) => task.status = TaskStatus::Running as i32,
        (topic::OOM, _) if !task.oom_killed => task.oom_killed = true,
        (topic::DELETE, _) => return Effect::Removed,
        _ => return Effect::Unchanged,
    }
    Effect::Changed
}

/// How many events of a batch changed something.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Events that changed or removed a record.
    pub changed: usize,
    /// Events that were no-ops.
    pub unchanged: usize,
}

/// Applies a batch of task events in order and stores the cursor of the
/// last one, in the caller's transaction, if the stored cursor is `after`
/// (the batch's predecessor); else `Internal` and nothing changes. So a
/// batch queued behind one that failed can never commit past it: the
/// applied events always run on from the stored cursor without a gap.
pub fn apply_batch(
    schema: &Schema,
    txn: &mut RwTxn,
    after: Cursor,
    batch: &[Delivered],
) -> Result<Applied> {
    let stored = schema.cursor(txn)?;
    if stored != after {
        return Err(crate::error::MetadataError::CursorMoved {
            expected: after.seq,
            stored: stored.seq,
        });
    }
    let mut applied = Applied::default();
    for delivered in batch {
        if apply_one(schema, txn, delivered)? {
            applied.changed += 1;
        } else {
            applied.unchanged += 1;
        }
    }
    if let Some(last) = batch.last() {
        schema.set_cursor(txn, last.cursor)?;
    }
    Ok(applied)
}

fn apply_one(schema: &Schema, txn: &mut RwTxn, delivered: &Delivered) -> Result<bool> {
    let envelope = &delivered.envelope;

    // The namespace is the subject's: NATS permissions confine who may
    // publish there, and an envelope naming another namespace is not
    // believed.
    let Ok(parsed) = berth_bus::subject::parse(&delivered.subject) else {
        return Ok(false);
    };
    let namespace = parsed.namespace;
    if envelope.namespace != namespace {
        tracing::warn!(namespace, topic = %envelope.topic, "task event names another namespace; ignored");
        return Ok(false);
    }
    let Ok(event) = TaskEvent::decode(envelope.payload.clone()) else {
        tracing::warn!(namespace, topic = %envelope.topic, "task event payload unreadable; ignored");
        return Ok(false);
    };

    // Only the reservation of the event's generation, only newer events.
    let Some(mut task) = schema.tasks.get(txn, namespace, &event.container_id)? else {
        return Ok(false);
    };
    if task.generation != envelope.generation || delivered.cursor.seq <= task.event_version {
        return Ok(false);
    }
    match apply_event(&mut task, &envelope.topic, &event) {
        Effect::Unchanged => Ok(false),
        Effect::Removed => {
            schema.tasks.delete(txn, namespace, &event.container_id)?;
            Ok(true)
        }
        Effect::Changed => {
            task.event_version = delivered.cursor.seq;
            task.updated_at = Some(Timestamp::now());
            schema
                .tasks
                .put(txn, namespace, &event.container_id, &task)?;
            Ok(true)
        }
    }
}

/// The state of each task as its node reported it, by namespace and
/// container.
pub type NodeStates = HashMap<(String, String), State>;

/// Replaces the task records' state with what their nodes reported, forgets
/// the sequences of the old stream, and stores `from` as the cursor, in the
/// caller's transaction. Returns how many records took a node's state.
///
/// A record whose node did not answer, or does not know the reservation (a
/// create in flight, a task deleted while its release was lost), keeps the
/// state it had: its node's later events and releases still apply.
pub fn reconcile(
    schema: &Schema,
    txn: &mut RwTxn,
    states: &NodeStates,
    from: Cursor,
) -> Result<usize> {
    let mut taken = 0;
    for (namespace, mut task) in schema.tasks.all(txn)? {
        task.event_version = 0;
        let reported = states
            .get(&(namespace.clone(), task.container_id.clone()))
            .filter(|state| state.generation == task.generation && state.exec_id.is_empty());
        if let Some(state) = reported {
            if let Some(status) = parse_status(&state.status) {
                task.status = status as i32;
            }
            task.pid = state.pid;
            task.exit_status = state.exit_status;
            task.exited_at = state.exited_at;
            task.oom_killed |= state.oom_killed;
            task.updated_at = Some(Timestamp::now());
            taken += 1;
        }
        let container_id = task.container_id.clone();
        schema.tasks.put(txn, &namespace, &container_id, &task)?;
    }
    schema.set_cursor(txn, from)?;
    Ok(taken)
}

/// The task service's state names.
fn parse_status(status: &str) -> Option<TaskStatus> {
    Some(match status {
        "created" => TaskStatus::Created,
        "running" => TaskStatus::Running,
        "paused" => TaskStatus::Paused,
        "stopped" => TaskStatus::Stopped,
        "unknown" => TaskStatus::Unknown,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::Envelope;

    fn task(status: TaskStatus) -> Task {
        Task {
            container_id: "c".into(),
            generation: 1,
            status: status as i32,
            ..Default::default()
        }
    }

    fn event(pid: u32, exit_status: u32) -> TaskEvent {
        TaskEvent {
            container_id: "c".into(),
            pid,
            exit_status,
            ..Default::default()
        }
    }

    #[test]
    fn events_move_the_state_forward_only() {
        use TaskStatus::*;
        let cases: &[(&str, TaskStatus, &str, Effect, TaskStatus)] = &[
            (
                "create keeps created",
                Created,
                topic::CREATE,
                Effect::Changed,
                Created,
            ),
            (
                "start runs",
                Created,
                topic::START,
                Effect::Changed,
                Running,
            ),
            (
                "start again is a duplicate",
                Running,
                topic::START,
                Effect::Unchanged,
                Running,
            ),
            (
                "start after the exit is late",
                Stopped,
                topic::START,
                Effect::Unchanged,
                Stopped,
            ),
            (
                "create after the start is late",
                Running,
                topic::CREATE,
                Effect::Unchanged,
                Running,
            ),
            ("pause", Running, topic::PAUSED, Effect::Changed, Paused),
            (
                "pause twice",
                Paused,
                topic::PAUSED,
                Effect::Unchanged,
                Paused,
            ),
            ("resume", Paused, topic::RESUMED, Effect::Changed, Running),
            (
                "resume while running",
                Running,
                topic::RESUMED,
                Effect::Unchanged,
                Running,
            ),
            (
                "resume after the exit",
                Stopped,
                topic::RESUMED,
                Effect::Unchanged,
                Stopped,
            ),
            (
                "exit while paused",
                Paused,
                topic::EXIT,
                Effect::Changed,
                Stopped,
            ),
            (
                "exit twice keeps the first",
                Stopped,
                topic::EXIT,
                Effect::Unchanged,
                Stopped,
            ),
            (
                "delete removes",
                Stopped,
                topic::DELETE,
                Effect::Removed,
                Stopped,
            ),
            (
                "exec topics are not the init's",
                Running,
                "tasks.exec-exited",
                Effect::Unchanged,
                Running,
            ),
            (
                "unknown topics",
                Running,
                "tasks.other",
                Effect::Unchanged,
                Running,
            ),
        ];
        for (case, from, topic, effect, to) in cases {
            let mut record = task(*from);
            assert_eq!(
                apply_event(&mut record, topic, &event(7, 3)),
                *effect,
                "{case}"
            );
            assert_eq!(record.status, *to as i32, "{case}");
        }
    }

    #[test]
    fn exit_and_oom_keep_what_they_learned() {
        let mut record = task(TaskStatus::Running);
        assert_eq!(
            apply_event(&mut record, topic::OOM, &event(0, 0)),
            Effect::Changed
        );
        assert_eq!(
            apply_event(&mut record, topic::OOM, &event(0, 0)),
            Effect::Unchanged
        );
        apply_event(&mut record, topic::EXIT, &event(0, 137));
        assert!(
            record.oom_killed,
            "an exit without the flag keeps the oom seen"
        );
        assert_eq!(record.exit_status, 137);
        apply_event(&mut record, topic::EXIT, &event(0, 1));
        assert_eq!(record.exit_status, 137, "a second exit is a duplicate");
    }

    #[test]
    fn an_init_topic_naming_an_exec_process_is_ignored() {
        let mut record = task(TaskStatus::Running);
        let mut exit = event(9, 1);
        exit.exec_id = "e1".into();
        assert_eq!(
            apply_event(&mut record, topic::EXIT, &exit),
            Effect::Unchanged
        );
        assert_eq!(record.status, TaskStatus::Running as i32);
    }

    /// A schema holding one reservation of generation 1 in namespace `ns`.
    fn reserved() -> (tempfile::TempDir, Schema) {
        let dir = tempfile::tempdir().unwrap();
        let schema = Schema::open(dir.path()).unwrap();
        let mut txn = schema.env.write_txn().unwrap();
        schema
            .tasks
            .put(&mut txn, "ns", "c", &task(TaskStatus::Created))
            .unwrap();
        txn.commit().unwrap();
        (dir, schema)
    }

    fn delivered(
        seq: u64,
        subject_ns: &str,
        envelope_ns: &str,
        topic: &str,
        generation: u64,
    ) -> Delivered {
        Delivered {
            cursor: Cursor {
                stream_created: 1,
                seq,
            },
            envelope: Envelope {
                topic: topic.into(),
                namespace: envelope_ns.into(),
                generation,
                payload: event(7, 3).encode_to_vec().into(),
                ..Default::default()
            },
            subject: format!("berth.v1.{subject_ns}.events.{topic}"),
        }
    }

    #[test]
    fn a_batch_applies_each_event_once_and_stores_its_cursor() {
        let (_dir, schema) = reserved();
        let batch = [
            delivered(10, "ns", "ns", topic::START, 1),
            delivered(11, "ns", "ns", topic::EXIT, 2),
            delivered(12, "other", "ns", topic::EXIT, 1),
            delivered(13, "ns", "ns", topic::PAUSED, 1),
        ];
        let mut txn = schema.env.write_txn().unwrap();
        let applied = apply_batch(&schema, &mut txn, Cursor::default(), &batch).unwrap();
        txn.commit().unwrap();

        // The start and the pause applied; the exit of another reservation
        // and the one naming another namespace than its subject did not.
        assert_eq!(
            applied,
            Applied {
                changed: 2,
                unchanged: 2
            }
        );
        let txn = schema.env.read_txn().unwrap();
        let record = schema.tasks.require(&txn, "ns", "c").unwrap();
        assert_eq!(record.status, TaskStatus::Paused as i32);
        assert_eq!(record.event_version, 13);
        assert_eq!(schema.cursor(&txn).unwrap().seq, 13);
        drop(txn);

        // A batch that does not follow the stored cursor is refused whole.
        let stored = batch[3].cursor;
        let late = [delivered(14, "ns", "ns", topic::RESUMED, 1)];
        let mut txn = schema.env.write_txn().unwrap();
        let refused = apply_batch(&schema, &mut txn, batch[1].cursor, &late);
        assert!(matches!(
            refused,
            Err(crate::error::MetadataError::CursorMoved { .. })
        ));

        // An event at or below the record's last one (a redelivery after a
        // reconcile) changes nothing.
        let again = [delivered(10, "ns", "ns", topic::RESUMED, 1)];
        let applied = apply_batch(&schema, &mut txn, stored, &again).unwrap();
        assert_eq!(applied.changed, 0);
    }
}
