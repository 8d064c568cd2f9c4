//! `edge-coordinator rollout pause|resume|abort ID`: controls a staged rollout
//! (`deploy --strategy canary`) through the control spool, and waits until `serve` applied it.

use anyhow::Result;
use clap::Subcommand;
use edge_coordinator::deploy::control;
use edge_coordinator::deploy::engine::Control;

use super::{StateArgs, resolve_state_dir};

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
    let now = control::apply(&state_dir, &id, action)?;
    eprintln!(
        "rollout {id}: {}{}",
        if now { "" } else { "already " },
        control::done_word(action)
    );
    Ok(())
}
