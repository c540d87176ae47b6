//! Acting on running tasks over NATS, with real runc and busybox: pause and
//! resume, exec, stop, ps, metrics, limits and the OOM killer. Needs root.

mod common;

use std::time::Duration;

use anyhow::Result;

use berth_bus::Code;
use berth_proto::{metadata as mpb, task as tpb};
use common::Node;

/// The freezer state of a process's cgroup (v1 freezer or v2 `cgroup.freeze`).
fn freezer_state(pid: u32) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        if controllers.split(',').any(|c| c == "freezer") {
            let file = format!("/sys/fs/cgroup/freezer{path}/freezer.state");
            return std::fs::read_to_string(file)
                .unwrap_or_default()
                .trim()
                .to_string();
        }
        if controllers.is_empty() {
            let file = format!("/sys/fs/cgroup{path}/cgroup.freeze");
            let frozen = std::fs::read_to_string(file).unwrap_or_default().trim() == "1";
            return if frozen { "FROZEN" } else { "THAWED" }.to_string();
        }
    }
    String::new()
}

async fn exec_output(node: &Node, container_id: &str, exec_id: &str) -> Result<(Vec<u8>, u32)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let state = loop {
        let state = node
            .task()
            .state(&tpb::StateRequest {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
            })
            .await?
            .state
            .unwrap_or_default();
        if state.status == "stopped" {
            break state;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "exec {exec_id} did not exit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let logs = node
        .task()
        .logs(&tpb::LogsRequest {
            container_id: container_id.into(),
            stream: tpb::Stream::Stdout as i32,
            exec_id: exec_id.into(),
            ..Default::default()
        })
        .await?;
    assert!(logs.eof);
    Ok((logs.data.to_vec(), state.exit_status))
}

/// pause freezes and resume thaws, each recorded and published; an exec
/// runs beside the init with its own output and exit status; ps lists both
/// processes while the exec runs; metrics count the task's memory and pids.
#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_exec_ps_and_metrics() -> Result<()> {
    let node = Node::start("control").await?;
    let image = node.import_busybox().await?;
    let options = mpb::RunOptions {
        args: vec!["sleep".into(), "600".into()],
        memory_bytes: 64 << 20,
        pids_limit: 50,
        ..Default::default()
    };
    node.container_with("c", &image, options).await?;
    let pid = node.run("c").await?;

    // pause and resume, refused out of order.
    let task = node.task();
    task.pause(&tpb::PauseRequest {
        container_id: "c".into(),
    })
    .await?;
    assert_eq!(node.state("c").await?.status, "paused");
    assert_eq!(freezer_state(pid), "FROZEN");
    let again = task
        .pause(&tpb::PauseRequest {
            container_id: "c".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code, Code::FailedPrecondition, "{again}");
    let exec_while_paused = task
        .exec(&tpb::ExecRequest {
            container_id: "c".into(),
            exec_id: "e0".into(),
            args: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(exec_while_paused.code, Code::FailedPrecondition);
    task.resume(&tpb::ResumeRequest {
        container_id: "c".into(),
    })
    .await?;
    assert_eq!(node.state("c").await?.status, "running");
    assert_eq!(freezer_state(pid), "THAWED");

    // exec: own output, env and working directory, own exit status.
    let started = task
        .exec(&tpb::ExecRequest {
            container_id: "c".into(),
            exec_id: "e1".into(),
            args: vec![
                "sh".into(),
                "-c".into(),
                "echo $GREETING from $(pwd); exit 3".into(),
            ],
            env: vec!["GREETING=hello".into()],
            working_dir: "/tmp".into(),
            ..Default::default()
        })
        .await?;
    assert!(started.pid > 0);
    let (output, status) = exec_output(&node, "c", "e1").await?;
    assert_eq!(String::from_utf8_lossy(&output), "hello from /tmp\n");
    assert_eq!(status, 3);
    let user = task
        .exec(&tpb::ExecRequest {
            container_id: "c".into(),
            exec_id: "e2".into(),
            args: vec!["id".into(), "-u".into()],
            user: "nobody".into(),
            ..Default::default()
        })
        .await?;
    assert!(user.pid > 0);
    let (output, status) = exec_output(&node, "c", "e2").await?;
    assert_eq!(
        (String::from_utf8_lossy(&output).trim(), status),
        ("65534", 0)
    );
    let duplicate = task
        .exec(&tpb::ExecRequest {
            container_id: "c".into(),
            exec_id: "e2".into(),
            args: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(duplicate.code, Code::AlreadyExists);
    let deleted = task
        .delete(&tpb::DeleteRequest {
            container_id: "c".into(),
            exec_id: "e1".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(deleted.exit_status, 3);
    let state = node.state("c").await?;
    assert_eq!(state.execs.len(), 1, "{state:?}");

    // ps sees the init and a running exec.
    task.exec(&tpb::ExecRequest {
        container_id: "c".into(),
        exec_id: "e3".into(),
        args: vec!["sleep".into(), "30".into()],
        ..Default::default()
    })
    .await?;
    let ps = task
        .ps(&tpb::PsRequest {
            container_id: "c".into(),
        })
        .await?;
    let commands: Vec<_> = ps.processes.iter().map(|p| p.command.as_str()).collect();
    assert!(commands.contains(&"sleep 600"), "{commands:?}");
    assert!(commands.contains(&"sleep 30"), "{commands:?}");
    assert!(ps.processes.iter().any(|p| p.pid == pid));

    // A signal to one exec process ends it and leaves the init running.
    task.kill(&tpb::KillRequest {
        container_id: "c".into(),
        signal: libc::SIGKILL as u32,
        exec_id: "e3".into(),
        ..Default::default()
    })
    .await?;
    let (_, killed) = exec_output(&node, "c", "e3").await?;
    assert_eq!(killed, 137);
    assert_eq!(node.state("c").await?.status, "running");

    let metrics = task
        .metrics(&tpb::MetricsRequest {
            container_id: "c".into(),
        })
        .await?;
    assert_eq!(metrics.memory_limit_bytes, 64 << 20);
    assert!(metrics.memory_usage_bytes > 0);
    assert_eq!(metrics.pids_limit, 50);
    assert!(metrics.pids_current >= 1, "{metrics:?}");
    assert_eq!(metrics.oom_kills, 0);

    // update raises the process limit of the live task.
    task.update(&tpb::UpdateRequest {
        container_id: "c".into(),
        pids_limit: 80,
        ..Default::default()
    })
    .await?;
    let metrics = task
        .metrics(&tpb::MetricsRequest {
            container_id: "c".into(),
        })
        .await?;
    assert_eq!(metrics.pids_limit, 80);

    let topics = node.task_topics("c").await?;
    let at = |topic: &str| topics.iter().position(|t| t == topic);
    for topic in [
        "tasks.paused",
        "tasks.resumed",
        "tasks.exec-added",
        "tasks.exec-started",
        "tasks.exec-exited",
    ] {
        assert!(at(topic).is_some(), "no {topic} in {topics:?}");
    }
    assert!(
        at("tasks.exec-added") < at("tasks.exec-started")
            && at("tasks.exec-started") < at("tasks.exec-exited"),
        "exec events out of order: {topics:?}"
    );

    let stopped = task
        .stop(&tpb::StopRequest {
            container_id: "c".into(),
            timeout_seconds: 5,
        })
        .await?;
    // busybox sleep as PID 1 has no SIGTERM handler, so only SIGKILL ends it.
    assert_eq!((stopped.exit_status, stopped.killed), (137, true));
    node.delete("c").await?;
    Ok(())
}

/// A memory limit the process exceeds: exit 137, the record and the event
/// say OOM, and `tasks.oom` is published with the exit.
#[tokio::test(flavor = "multi_thread")]
async fn oom_is_reported_under_16_and_32_mib() -> Result<()> {
    let node = Node::start("oom").await?;
    let image = node.import_busybox().await?;
    for mib in [16i64, 32] {
        let id = format!("oom{mib}");
        let options = mpb::RunOptions {
            // dd holds one 64 MiB block in memory, over either limit.
            args: vec![
                "dd".into(),
                "if=/dev/zero".into(),
                "of=/dev/null".into(),
                "bs=64M".into(),
                "count=1".into(),
            ],
            memory_bytes: mib << 20,
            ..Default::default()
        };
        node.container_with(&id, &image, options).await?;
        node.run(&id).await?;
        let state = node.wait_stopped(&id).await?;
        assert_eq!(state.exit_status, 137, "{state:?}");
        assert!(state.oom_killed, "{state:?}");
        let applied = node.wait_applied(&id).await?;
        assert!(applied.oom_killed);
        let topics: Vec<_> = node.task_events(&id).await?;
        assert!(
            topics.contains(&("tasks.oom".to_string(), 137)),
            "{topics:?}"
        );
        node.delete(&id).await?;
    }
    Ok(())
}

async fn stdout_of(node: &Node, container_id: &str) -> Result<String> {
    let logs = node
        .task()
        .logs(&tpb::LogsRequest {
            container_id: container_id.into(),
            stream: tpb::Stream::Stdout as i32,
            ..Default::default()
        })
        .await?;
    Ok(String::from_utf8_lossy(&logs.data).into_owned())
}

/// An open stdin reaches the process in order and its end is EOF; a task
/// without one refuses input.
#[tokio::test(flavor = "multi_thread")]
async fn stdin_is_piped_to_the_process() -> Result<()> {
    let node = Node::start("stdin").await?;
    let image = node.import_busybox().await?;
    let options = mpb::RunOptions {
        args: vec!["sh".into(), "-c".into(), "cat; echo done".into()],
        stdin: true,
        ..Default::default()
    };
    node.container_with("cat", &image, options).await?;
    node.run("cat").await?;
    let task = node.task();
    for chunk in ["hello ", "from ", "stdin\n"] {
        task.stdin(&tpb::StdinRequest {
            container_id: "cat".into(),
            data: chunk.as_bytes().to_vec().into(),
            close: false,
            ..Default::default()
        })
        .await?;
    }
    task.stdin(&tpb::StdinRequest {
        container_id: "cat".into(),
        data: Default::default(),
        close: true,
        ..Default::default()
    })
    .await?;
    assert_eq!(node.wait_stopped("cat").await?.exit_status, 0);
    assert_eq!(stdout_of(&node, "cat").await?, "hello from stdin\ndone\n");

    node.container("closed", &image, &["sleep", "5"]).await?;
    node.run("closed").await?;
    let refused = task
        .stdin(&tpb::StdinRequest {
            container_id: "closed".into(),
            data: b"x".to_vec().into(),
            close: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code, Code::FailedPrecondition, "{refused}");
    Ok(())
}

/// A terminal: the process sees a tty of the size set before start, reads
/// what is typed, and its output (echo included) is the one stream.
#[tokio::test(flavor = "multi_thread")]
async fn tty_gets_size_input_and_output() -> Result<()> {
    let node = Node::start("tty").await?;
    let image = node.import_busybox().await?;
    let options = mpb::RunOptions {
        args: vec![
            "sh".into(),
            "-c".into(),
            "tty; stty size; read line; echo got $line".into(),
        ],
        tty: true,
        ..Default::default()
    };
    node.container_with("t", &image, options).await?;
    let task = node.task();
    task.create(&tpb::CreateRequest {
        container_id: "t".into(),
        start: false,
    })
    .await?;
    task.resize(&tpb::ResizeRequest {
        container_id: "t".into(),
        width: 100,
        height: 40,
        ..Default::default()
    })
    .await?;
    task.start(&tpb::StartRequest {
        container_id: "t".into(),
    })
    .await?;
    task.stdin(&tpb::StdinRequest {
        container_id: "t".into(),
        data: b"typed\n".to_vec().into(),
        close: false,
        ..Default::default()
    })
    .await?;
    assert_eq!(node.wait_stopped("t").await?.exit_status, 0);
    let output = stdout_of(&node, "t").await?;
    assert!(output.contains("/dev/pts/"), "{output:?}");
    assert!(output.contains("40 100"), "{output:?}");
    assert!(output.contains("got typed"), "{output:?}");
    Ok(())
}

/// An exec process with an open stdin, and one with a terminal.
#[tokio::test(flavor = "multi_thread")]
async fn exec_gets_stdin_and_a_terminal() -> Result<()> {
    let node = Node::start("execio").await?;
    let image = node.import_busybox().await?;
    node.container("x", &image, &["sleep", "600"]).await?;
    node.run("x").await?;
    let task = node.task();

    task.exec(&tpb::ExecRequest {
        container_id: "x".into(),
        exec_id: "cat".into(),
        args: vec!["cat".into()],
        stdin: true,
        ..Default::default()
    })
    .await?;
    task.stdin(&tpb::StdinRequest {
        container_id: "x".into(),
        data: b"piped\n".to_vec().into(),
        close: true,
        exec_id: "cat".into(),
    })
    .await?;
    let (output, status) = exec_output(&node, "x", "cat").await?;
    assert_eq!(
        (String::from_utf8_lossy(&output).as_ref(), status),
        ("piped\n", 0)
    );

    task.exec(&tpb::ExecRequest {
        container_id: "x".into(),
        exec_id: "tty".into(),
        args: vec![
            "sh".into(),
            "-c".into(),
            "tty; read line; echo got $line".into(),
        ],
        tty: true,
        ..Default::default()
    })
    .await?;
    task.stdin(&tpb::StdinRequest {
        container_id: "x".into(),
        data: b"word\n".to_vec().into(),
        close: false,
        exec_id: "tty".into(),
    })
    .await?;
    let (output, status) = exec_output(&node, "x", "tty").await?;
    let output = String::from_utf8_lossy(&output);
    assert_eq!(status, 0);
    assert!(
        output.contains("/dev/pts/") && output.contains("got word"),
        "{output:?}"
    );
    Ok(())
}
