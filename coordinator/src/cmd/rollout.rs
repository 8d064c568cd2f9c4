//! `edge-coordinator rollout pause|resume|abort ID`: controls a staged rollout
//! (`deploy --strategy canary`) through the control spool, and waits until `serve` applied it.

use anyhow::{Context, Result};
use clap::Subcommand;
use edge_coordinator::deploy::engine::Control;
use edge_coordinator::deploy::spool::{self, ControlRequest};

use super::{PICKUP_TIMEOUT, PROGRESS_POLL, StateArgs, resolve_state_dir};

#[derive(Debug, Subcommand)]
pub(crate) enum RolloutCommand {
    /// Start no new wave; devices already updating go on, and failures still halt it.
    Pause {
        id: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Start waves again.
    Resume {
        id: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Halt the rollout and roll the devices already updated back to the previous pipeline.
    Abort {
        id: String,
        #[command(flatten)]
        state: StateArgs,
    },
}

pub(crate) fn rollout(command: RolloutCommand) -> Result<()> {
    let (id, state, action) = match command {
        RolloutCommand::Pause { id, state } => (id, state, Control::Pause),
        RolloutCommand::Resume { id, state } => (id, state, Control::Resume),
        RolloutCommand::Abort { id, state } => (id, state, Control::Abort),
    };
    let state_dir = resolve_state_dir(state.state_dir, state.config)?;
    let applied = |p: &edge_coordinator::deploy::progress::ProgressFile| {
        let Some(w) = &p.waves else { return false };
        match action {
            Control::Pause => w.paused,
            Control::Resume => !w.paused,
            Control::Abort => w.is_halted(),
        }
    };
    // Just spooled (`deploy --no-wait`): give serve its pick-up time.
    let spooled = spool::spool_dir(&state_dir).join(&id);
    let start = std::time::Instant::now();
    let progress = loop {
        match spool::read_progress(&state_dir, &id)? {
            Some(p) => break p,
            None if spooled.exists() && start.elapsed() < PICKUP_TIMEOUT => {
                std::thread::sleep(PROGRESS_POLL)
            }
            None if spooled.exists() => anyhow::bail!(
                "rollout {id} is spooled but no coordinator picked it up within {} s; is `edge-coordinator serve` running with state_dir {}?",
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            ),
            None => anyhow::bail!(
                "no rollout {id} in {} (is the id right?)",
                state_dir.display()
            ),
        }
    };
    if let Some(reason) = &progress.finished {
        anyhow::bail!("rollout {id} has finished: {reason}");
    }
    let Some(waves) = &progress.waves else {
        anyhow::bail!(
            "rollout {id} was not started with --strategy canary; it has no waves to pause, resume or abort"
        );
    };
    if waves.is_halted() {
        anyhow::bail!("rollout {id} is halted already and rolling back");
    }
    if applied(&progress) {
        eprintln!("rollout {id}: already {}", done_word(action));
        return Ok(());
    }
    let path = spool::write_control(
        &state_dir,
        &ControlRequest {
            deployment_id: id.clone(),
            action,
        },
    )
    .context("cannot spool the rollout request")?;
    let start = std::time::Instant::now();
    loop {
        if let Some(p) = spool::read_progress(&state_dir, &id)? {
            if applied(&p) {
                eprintln!("rollout {id}: {}", done_word(action));
                return Ok(());
            }
            if let Some(reason) = &p.finished {
                anyhow::bail!("rollout {id} finished before the request applied: {reason}");
            }
        }
        if start.elapsed() > PICKUP_TIMEOUT && path.exists() {
            anyhow::bail!(
                "no coordinator took the request {} within {} s; is `edge-coordinator serve` running with state_dir {}? It applies when it starts",
                path.display(),
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            );
        }
        if start.elapsed() > PICKUP_TIMEOUT * 3 {
            anyhow::bail!(
                "serve took the request but rollout {id} does not show it; see serve's log"
            );
        }
        std::thread::sleep(PROGRESS_POLL);
    }
}

fn done_word(action: Control) -> &'static str {
    match action {
        Control::Pause => "paused (no new wave starts)",
        Control::Resume => "resumed",
        Control::Abort => {
            "halted; the updated devices are being rolled back (watch with `deploy`'s progress or the journal)"
        }
    }
}
