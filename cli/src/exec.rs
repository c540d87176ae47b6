//! `berth exec`: another process in a running container, its output
//! streamed and its status returned, then its record deleted.

use std::process::ExitCode;

use clap::Args;

use berth_proto::task as tpb;

use crate::follow::{self, Followed, Proc};
use crate::{containers, flags, Ctx};

/// `berth exec` flags.
#[derive(Args)]
pub struct ExecArgs {
    /// Run in the background and print the exec id.
    #[arg(short, long)]
    detach: bool,
    /// Set an environment variable: `KEY=value`, or `KEY` to pass berth's own.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the container (default: the container's).
    #[arg(short, long)]
    workdir: Option<String>,
    /// User: `uid`, `uid:gid`, `name` or `name:group` (default: the container's).
    #[arg(short, long)]
    user: Option<String>,
    /// Keep stdin open and pass berth's stdin to the process.
    #[arg(short, long)]
    interactive: bool,
    /// Give the process a terminal.
    #[arg(short, long)]
    tty: bool,
    /// The container.
    container: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    args: Vec<String>,
}

/// A random exec id.
fn new_exec_id() -> String {
    format!("exec-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Runs `berth exec`: exits with the process's status. berth's signals go
/// to the exec process; three Ctrl-C detach berth and leave it running.
pub async fn exec(ctx: &Ctx, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let container = containers::get(ctx, &args.container).await?;
    let task = containers::task_of(ctx, &container);
    let exec_id = new_exec_id();

    // Subscribe before the start, so even an instant exit is seen.
    let exits = follow::exit_events(ctx, true).await?;
    task.exec(&tpb::ExecRequest {
        container_id: container.container_id.clone(),
        exec_id: exec_id.clone(),
        args: args.args.clone(),
        env: flags::env_entries(&args.env)?,
        working_dir: args.workdir.clone().unwrap_or_default(),
        user: args.user.clone().unwrap_or_default(),
        stdin: args.interactive && !args.detach,
        tty: args.tty,
    })
    .await
    .map_err(|err| match err.code {
        berth_bus::Code::NotFound => containers::task_error(err, &args.container),
        _ => crate::run::start_failure(err, &args.container),
    })?;
    if args.detach {
        println!("{exec_id}");
        return Ok(ExitCode::SUCCESS);
    }

    let proc = Proc {
        task: task.clone(),
        container_id: container.container_id.clone(),
        exec_id: exec_id.clone(),
    };
    if args.tty {
        crate::attach::set_size(&task, &container.container_id, &exec_id).await?;
    }
    let followed =
        crate::run::follow_init(&proc, args.tty, args.interactive, exits, [0, 0]).await?;
    let Followed::Exited(exited) = followed else {
        eprintln!("berth: detached from exec {exec_id}, which keeps running");
        return Ok(ExitCode::from(130));
    };
    task.delete(&tpb::DeleteRequest {
        container_id: container.container_id.clone(),
        exec_id,
        ..Default::default()
    })
    .await?;
    Ok(ExitCode::from(exited.status.min(255) as u8))
}
