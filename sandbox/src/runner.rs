//! [`StageRunner`]: owns one stage's instance, replaces it after a trap (fresh instance,
//! `init` again) with exponential backoff, and marks the stage failed after
//! `max_consecutive_traps` traps in a row. The restart decisions are a plain state machine,
//! [`RestartPolicy`], with no clock or I/O of its own.
//!
//! Frames that arrive while a restart is pending are refused with
//! [`SandboxError::Restarting`] (the runner never sleeps); a driver that wants no frame but
//! the trapping one to fail waits until [`StageRunner::ready_at`] before the next frame.
//! Call from a dedicated thread or `spawn_blocking`, never on an async task: guest calls
//! block, and WASI's synchronous bindings enter a tokio runtime of their own.

use std::time::{Duration, Instant};

use super::bindings::edge::pipeline::types::Frame;
use super::instance::{StageContext, StageInstance};
use super::{Module, Sandbox, SandboxError};

/// Restart decisions for one stage.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    max_traps: u32,
    backoff_min: Duration,
    backoff_max: Duration,
    consecutive: u32,
    next_attempt: Option<Instant>,
    failed: bool,
}

/// What to do after a trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterTrap {
    /// Create a fresh instance at (or after) this time.
    RestartAt(Instant),
    /// Too many consecutive traps: stop.
    Fail,
}

impl RestartPolicy {
    pub fn new(max_traps: u32, backoff_min: Duration, backoff_max: Duration) -> Self {
        RestartPolicy {
            max_traps: max_traps.max(1),
            backoff_min,
            backoff_max,
            consecutive: 0,
            next_attempt: None,
            failed: false,
        }
    }

    /// Consecutive traps so far.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Delay before the restart that follows trap number `n` (1-based): min, 2*min, 4*min..,
    /// capped at max.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff_min
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }

    pub fn on_trap(&mut self, now: Instant) -> AfterTrap {
        self.consecutive = self.consecutive.saturating_add(1);
        if self.consecutive >= self.max_traps {
            self.failed = true;
            self.next_attempt = None;
            return AfterTrap::Fail;
        }
        let at = now + self.backoff(self.consecutive);
        self.next_attempt = Some(at);
        AfterTrap::RestartAt(at)
    }

    /// A call completed without a trap (a rejected frame counts: the module is healthy).
    pub fn on_success(&mut self) {
        self.consecutive = 0;
        self.next_attempt = None;
    }

    /// Whether a restart may be attempted at `now`; otherwise how long until it may.
    pub fn may_restart(&self, now: Instant) -> Result<(), Duration> {
        match self.next_attempt {
            Some(at) if at > now => Err(at - now),
            _ => Ok(()),
        }
    }

    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }
}

/// Owns and supervises the instance of one stage.
pub struct StageRunner {
    sandbox: Sandbox,
    module: Module,
    ctx: StageContext,
    config_json: String,
    instance: Option<StageInstance>,
    policy: RestartPolicy,
    last_trap: Option<String>,
}

impl std::fmt::Debug for StageRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageRunner")
            .field("stage", &self.ctx.stage)
            .field("module", self.module.id())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl StageRunner {
    /// Instantiates `module` for the stage and calls `init(config_json)`. Any failure here
    /// (including a refused config) is returned: a stage that cannot start is reported, not
    /// retried.
    pub fn start(
        sandbox: &Sandbox,
        module: &Module,
        ctx: StageContext,
        config_json: &str,
    ) -> Result<StageRunner, SandboxError> {
        let cfg = sandbox.config();
        let policy = RestartPolicy::new(
            cfg.max_consecutive_traps,
            Duration::from_millis(cfg.restart_backoff_min_ms),
            Duration::from_millis(cfg.restart_backoff_max_ms),
        );
        let mut runner = StageRunner {
            sandbox: sandbox.clone(),
            module: module.clone(),
            ctx,
            config_json: config_json.to_owned(),
            instance: None,
            policy,
            last_trap: None,
        };
        runner.instance = Some(runner.fresh_instance()?);
        Ok(runner)
    }

    fn fresh_instance(&self) -> Result<StageInstance, SandboxError> {
        let mut inst = self.sandbox.instantiate(&self.module, &self.ctx)?;
        inst.init(&self.config_json)?;
        Ok(inst)
    }

    pub fn stage(&self) -> &str {
        &self.ctx.stage
    }

    pub fn metrics(&self) -> &std::sync::Arc<super::StageMetrics> {
        &self.ctx.metrics
    }

    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// When the next frame can be processed: `None` if now (or never, when failed; see
    /// [`StageRunner::is_failed`]).
    pub fn ready_at(&self) -> Option<Instant> {
        if self.instance.is_some() {
            None
        } else {
            self.policy.next_attempt()
        }
    }

    pub fn is_failed(&self) -> bool {
        self.policy.is_failed()
    }

    fn failed_error(&self) -> SandboxError {
        SandboxError::StageFailed {
            stage: self.ctx.stage.clone(),
            traps: self.policy.consecutive(),
            last: self.last_trap.clone().unwrap_or_default(),
        }
    }

    /// Records a trap: drops the instance, schedules the restart or fails the stage.
    fn on_trap(&mut self, err: &SandboxError) {
        self.instance = None;
        self.last_trap = Some(err.to_string());
        match self.policy.on_trap(Instant::now()) {
            AfterTrap::RestartAt(at) => {
                tracing::warn!(
                    stage = %self.ctx.stage, module = %self.module.id(), error = %err,
                    consecutive = self.policy.consecutive(),
                    restart_in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64,
                    "stage trapped; instance discarded, restarting"
                );
            }
            AfterTrap::Fail => {
                tracing::error!(
                    stage = %self.ctx.stage, module = %self.module.id(), error = %err,
                    traps = self.policy.consecutive(),
                    "stage failed: too many consecutive traps; not restarting"
                );
                self.ctx.metrics.record_failed(&err.to_string());
            }
        }
    }

    /// Processes one frame, restarting the instance first if a restart is due.
    pub fn process(&mut self, frame: &Frame) -> Result<Vec<Frame>, SandboxError> {
        if self.policy.is_failed() {
            self.ctx.metrics.record_refused();
            return Err(self.failed_error());
        }
        if self.instance.is_none() {
            if let Err(wait) = self.policy.may_restart(Instant::now()) {
                self.ctx.metrics.record_refused();
                return Err(SandboxError::Restarting {
                    stage: self.ctx.stage.clone(),
                    retry_in_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                });
            }
            self.ctx.metrics.record_restart();
            match self.fresh_instance() {
                Ok(inst) => self.instance = Some(inst),
                Err(e) => {
                    // A trap in the new instance's start or init counts like any trap; a
                    // config refused now (it was accepted before) or a host failure too:
                    // the stage cannot run, and backing off is the right reaction.
                    self.ctx.metrics.record_refused();
                    self.on_trap(&e);
                    return Err(if self.policy.is_failed() {
                        self.failed_error()
                    } else {
                        e
                    });
                }
            }
        }
        let Some(inst) = self.instance.as_mut() else {
            return Err(self.failed_error());
        };
        let result = inst.process(frame);
        match &result {
            Err(e) if e.poisons_instance() => self.on_trap(e),
            _ => self.policy.on_success(),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_then_fails() {
        let ms = Duration::from_millis;
        let mut p = RestartPolicy::new(5, ms(100), ms(500));
        assert_eq!(
            (1..=5).map(|n| p.backoff(n)).collect::<Vec<_>>(),
            [ms(100), ms(200), ms(400), ms(500), ms(500)]
        );
        assert_eq!(p.backoff(100), ms(500));
        let t0 = Instant::now();
        assert_eq!(p.may_restart(t0), Ok(()));
        assert_eq!(p.on_trap(t0), AfterTrap::RestartAt(t0 + ms(100)));
        assert_eq!(p.may_restart(t0 + ms(40)), Err(ms(60)));
        assert_eq!(p.may_restart(t0 + ms(100)), Ok(()));
        assert_eq!(p.on_trap(t0), AfterTrap::RestartAt(t0 + ms(200)));
        // Success resets the streak.
        p.on_success();
        assert_eq!(p.consecutive(), 0);
        assert_eq!(p.may_restart(t0), Ok(()));
        for n in 1..5 {
            assert!(matches!(p.on_trap(t0), AfterTrap::RestartAt(_)), "trap {n}");
        }
        assert_eq!(p.on_trap(t0), AfterTrap::Fail);
        assert!(p.is_failed());
    }
}
