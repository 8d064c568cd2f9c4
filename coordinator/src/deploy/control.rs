//! Pausing, resuming and aborting a staged rollout from outside `serve`: checks the rollout's
//! progress file, spools the request in the control spool, and waits until the progress file
//! shows it applied. Shared by `edge-coordinator rollout` and the HTTP API, so both refuse and
//! report the same way. Blocking (it polls files).

use std::path::Path;
use std::time::{Duration, Instant};

use super::engine::Control;
use super::progress::ProgressFile;
use super::spool::{self, ControlRequest};

/// How long serve may take to pick a request (or a just-spooled rollout) up: it polls its
/// spools every 500 ms.
const PICKUP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// Why a request was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no rollout {id} in {state_dir} (is the id right?)")]
    Unknown { id: String, state_dir: String },
    /// Finished, halted, or not staged: nothing to do (`HTTP 409`).
    #[error("{0}")]
    Refused(String),
    /// Serve did not take or apply the request in time.
    #[error("{0}")]
    NotApplied(String),
    #[error("{0}")]
    Io(String),
}

/// What an applied request did, in words.
pub fn done_word(action: Control) -> &'static str {
    match action {
        Control::Pause => "paused (no new wave starts)",
        Control::Resume => "resumed",
        Control::Abort => {
            "halted; the updated devices are being rolled back (watch with `deploy`'s progress or the journal)"
        }
    }
}

fn applied(action: Control, p: &ProgressFile) -> bool {
    let Some(w) = &p.waves else { return false };
    match action {
        Control::Pause => w.paused,
        Control::Resume => !w.paused,
        Control::Abort => w.is_halted(),
    }
}

/// Applies `action` to rollout `id` through `state_dir`'s control spool and waits for serve.
/// `Ok(true)`: applied now; `Ok(false)`: it already was (nothing spooled).
pub fn apply(state_dir: &Path, id: &str, action: Control) -> Result<bool, ControlError> {
    let io = |e: &dyn std::fmt::Display| ControlError::Io(e.to_string());
    // Just spooled (`deploy --no-wait`): give serve its pick-up time.
    let spooled = spool::spool_dir(state_dir).join(id);
    let start = Instant::now();
    let progress = loop {
        match spool::read_progress(state_dir, id).map_err(|e| io(&e))? {
            Some(p) => break p,
            None if spooled.exists() && start.elapsed() < PICKUP_TIMEOUT => {
                std::thread::sleep(POLL)
            }
            None if spooled.exists() => {
                return Err(ControlError::NotApplied(format!(
                    "rollout {id} is spooled but no coordinator picked it up within {} s; is `edge-coordinator serve` running with state_dir {}?",
                    PICKUP_TIMEOUT.as_secs(),
                    state_dir.display()
                )));
            }
            None => {
                return Err(ControlError::Unknown {
                    id: id.to_owned(),
                    state_dir: state_dir.display().to_string(),
                });
            }
        }
    };
    if let Some(reason) = &progress.finished {
        return Err(ControlError::Refused(format!(
            "rollout {id} has finished: {reason}"
        )));
    }
    let Some(waves) = &progress.waves else {
        return Err(ControlError::Refused(format!(
            "rollout {id} was not started with --strategy canary; it has no waves to pause, resume or abort"
        )));
    };
    if waves.is_halted() {
        return Err(ControlError::Refused(format!(
            "rollout {id} is halted already and rolling back"
        )));
    }
    if applied(action, &progress) {
        return Ok(false);
    }
    let path = spool::write_control(
        state_dir,
        &ControlRequest {
            deployment_id: id.to_owned(),
            action,
        },
    )
    .map_err(|e| ControlError::Io(format!("cannot spool the rollout request: {e}")))?;
    let start = Instant::now();
    loop {
        if let Some(p) = spool::read_progress(state_dir, id).map_err(|e| io(&e))? {
            if applied(action, &p) {
                return Ok(true);
            }
            if let Some(reason) = &p.finished {
                return Err(ControlError::Refused(format!(
                    "rollout {id} finished before the request applied: {reason}"
                )));
            }
        }
        if start.elapsed() > PICKUP_TIMEOUT && path.exists() {
            return Err(ControlError::NotApplied(format!(
                "no coordinator took the request {} within {} s; is `edge-coordinator serve` running with state_dir {}? It applies when it starts",
                path.display(),
                PICKUP_TIMEOUT.as_secs(),
                state_dir.display()
            )));
        }
        if start.elapsed() > PICKUP_TIMEOUT * 3 {
            return Err(ControlError::NotApplied(format!(
                "serve took the request but rollout {id} does not show it; see serve's log"
            )));
        }
        std::thread::sleep(POLL);
    }
}
