//! `edge-coordinator fl start|status|stop`: federated tasks, spooled for and read back from the
//! running `serve`'s state directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::{PICKUP_TIMEOUT, PROGRESS_POLL, StateArgs, resolve_state_dir};

#[derive(Debug, Subcommand)]
pub(crate) enum FlCommand {
    /// Validate a task file (TOML), read its initial model, run its trainer module once on a
    /// synthetic batch in the devices' sandbox (when it names one), and spool it for the running
    /// `serve`, which runs its rounds (signing each round message with the coordinator's own
    /// identity, the key devices pinned when they enrolled).
    Start {
        /// The task file; `initial`, `trainer` and `eval.holdout` paths are relative to it.
        task: PathBuf,
        #[command(flatten)]
        state: StateArgs,
        /// Spool the task and exit without waiting for `serve` to take it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show federated tasks and their rounds (participants, bytes, loss, accuracy).
    Status {
        /// Only this task.
        task: Option<String>,
        /// Print the tasks' state as JSON instead of tables (one object for a named task,
        /// else an array).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Stop a task: `serve` sends every member the current global weights marked done.
    Stop {
        task: String,
        #[command(flatten)]
        state: StateArgs,
        /// Exit without waiting for `serve` to stop the task.
        #[arg(long)]
        no_wait: bool,
    },
}

pub(crate) fn fl(command: FlCommand) -> Result<()> {
    match command {
        FlCommand::Start {
            task,
            state,
            no_wait,
        } => fl_start(&task, state, no_wait),
        FlCommand::Status { task, json, state } => fl_status(task.as_deref(), json, state),
        FlCommand::Stop {
            task,
            state,
            no_wait,
        } => fl_stop(&task, state, no_wait),
    }
}

pub(crate) fn fl_start(task: &std::path::Path, state: StateArgs, no_wait: bool) -> Result<()> {
    use edge_coordinator::fl::{files, task as fl_task};
    let loaded = fl_task::load(task)?;
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    let spooled = files::write_spool(&state_dir, &loaded).context("cannot spool the task")?;
    let spec = &loaded.spec;
    eprintln!(
        "task {}: {} rounds over {}, {} params ({} weights), {} + {}; spooled in {}",
        spec.id,
        spec.rounds,
        spec.members,
        spec.params.len(),
        loaded.initial.len(),
        spec.rule,
        spec.server_optimizer,
        spooled.display()
    );
    eprintln!("  clip: {}", spec.clip);
    match &loaded.trainer {
        Some(run) => eprintln!("  {run}"),
        None => eprintln!(
            "  trainer not checked: the task names no trainer (trainer = \"mlp_trainer.wasm\" runs it once on a synthetic batch before the task starts)"
        ),
    }
    if let Some(p) = &spec.privacy {
        // What the operator commits to before any round runs.
        let all = edge_coordinator::fl::privacy::epsilon(
            spec.rounds,
            f64::from(p.noise_multiplier),
            p.delta,
        );
        eprintln!(
            "  differential privacy: gaussian, noise_multiplier {}, delta {}: epsilon {:.2} after one round, {all:.2} after all {} rounds{}",
            p.noise_multiplier,
            p.delta,
            edge_coordinator::fl::privacy::epsilon(1, f64::from(p.noise_multiplier), p.delta),
            spec.rounds,
            p.max_epsilon.map_or_else(String::new, |m| format!(
                " (stops before passing max_epsilon {m})"
            ))
        );
    }
    if no_wait {
        return Ok(());
    }
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = files::read_state(&state_dir, &spec.id)? {
            if let edge_coordinator::fl::Phase::Finished { reason } = &s.phase {
                anyhow::bail!("task {}: {reason}", spec.id);
            }
            eprintln!(
                "task {} taken by serve: {}; follow it with `edge-coordinator fl status {}`",
                spec.id,
                s.phase.name(),
                spec.id
            );
            return Ok(());
        }
        if start.elapsed() > PICKUP_TIMEOUT {
            anyhow::bail!(
                "no coordinator picked up task {} from {} within {} s; is `edge-coordinator serve` running with state_dir {}? It starts when serve does",
                spec.id,
                spooled.display(),
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            );
        }
        std::thread::sleep(PROGRESS_POLL);
    }
}

pub(crate) fn fl_status(task: Option<&str>, json: bool, state: StateArgs) -> Result<()> {
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    if let Some(id) = task
        && !edge_coordinator::fl::task::valid_task_id(id)
    {
        anyhow::bail!("invalid task id {id:?}")
    }
    // A running coordinator answers through its API; otherwise (or if its API fails) the
    // state files it wrote.
    let states = match states_from_api(&state_dir, task) {
        Ok(Some(states)) => Some(states),
        Ok(None) => None,
        Err(e) => {
            eprintln!("warning: {e:#}; reading the state directory instead");
            None
        }
    };
    let states = match states {
        Some(states) => states,
        None => states_from_files(&state_dir, task)?,
    };
    render_status(&state_dir, task, json, &states)
}

/// Task states from the running serve's API (`GET /api/fl/tasks[/{id}]`, the `state` field);
/// `None` when none runs, or for a named task it has not started (the files say why).
fn states_from_api(
    state_dir: &std::path::Path,
    task: Option<&str>,
) -> Result<Option<Vec<edge_coordinator::fl::state::TaskState>>> {
    #[derive(serde::Deserialize)]
    struct Detail {
        state: edge_coordinator::fl::state::TaskState,
    }
    #[derive(serde::Deserialize)]
    struct Summary {
        task: String,
    }
    #[derive(serde::Deserialize)]
    struct List {
        tasks: Vec<Summary>,
    }
    let Some(api) = super::LocalApi::open(state_dir)? else {
        return Ok(None);
    };
    let ids = match task {
        Some(id) => vec![id.to_owned()],
        None => {
            let mut ids: Vec<String> = api
                .get::<List>("/api/fl/tasks")?
                .tasks
                .into_iter()
                .map(|t| t.task)
                .collect();
            ids.sort();
            ids
        }
    };
    let mut states = Vec::new();
    for id in ids {
        match api.get_found::<Detail>(&format!("/api/fl/tasks/{id}"))? {
            Some(d) => states.push(d.state),
            None if task.is_some() => return Ok(None),
            None => {}
        }
    }
    Ok(Some(states))
}

fn states_from_files(
    state_dir: &std::path::Path,
    task: Option<&str>,
) -> Result<Vec<edge_coordinator::fl::state::TaskState>> {
    use edge_coordinator::fl::files;
    let ids = match task {
        Some(id) => vec![id.to_owned()],
        None => files::tasks(state_dir)?,
    };
    let mut states = Vec::new();
    for id in &ids {
        match files::read_state(state_dir, id)? {
            Some(s) => states.push(s),
            None if task.is_some() => {
                if files::spool_dir(state_dir).join(id).is_dir()
                    || files::task_dir(state_dir, id).is_dir()
                {
                    anyhow::bail!("task {id} is spooled but no coordinator has started it yet");
                }
                anyhow::bail!("no federated task {id} in {}", state_dir.display());
            }
            None => {}
        }
    }
    Ok(states)
}

fn render_status(
    state_dir: &std::path::Path,
    task: Option<&str>,
    json: bool,
    states: &[edge_coordinator::fl::state::TaskState],
) -> Result<()> {
    use edge_coordinator::fl::status;
    if json {
        let text = match (task, states.first()) {
            (Some(_), Some(one)) => serde_json::to_string_pretty(one),
            _ => serde_json::to_string_pretty(&states),
        };
        println!("{}", text.context("cannot encode the task state")?);
        return Ok(());
    }
    if states.is_empty() {
        println!("no federated tasks in {}", state_dir.display());
    }
    let now = protocol::v1::now_ms();
    for (i, s) in states.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", status::render(s, now));
    }
    Ok(())
}

pub(crate) fn fl_stop(task: &str, state: StateArgs, no_wait: bool) -> Result<()> {
    use edge_coordinator::fl::{Phase, files};
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    files::request_stop(&state_dir, task)?;
    if no_wait {
        eprintln!("asked serve to stop task {task}");
        return Ok(());
    }
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = files::read_state(&state_dir, task)?
            && let Phase::Finished { reason } = &s.phase
        {
            eprintln!(
                "task {task} finished ({reason}) at global version {}",
                s.version
            );
            return Ok(());
        }
        if start.elapsed() > PICKUP_TIMEOUT {
            anyhow::bail!(
                "task {task} did not stop within {} s; is `edge-coordinator serve` running with state_dir {}? The request stays until it does",
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            );
        }
        std::thread::sleep(PROGRESS_POLL);
    }
}
