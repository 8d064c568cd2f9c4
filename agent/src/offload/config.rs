//! `[offload]` of the agent config: the offload section is owned here, beside the policy it
//! parameterises, and only aggregated by `crate::config`.

use serde::Deserialize;

use crate::setting::InvalidSetting;

/// `[offload]`: when an inference stage with an `offload_model` runs a frame locally and when
/// on the coordinator's inference service (see `crate::offload`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    /// `local` (never offload), `offload` (always, while online), `cost` (the cost model) or
    /// `adaptive` (the cost model corrected by observed latencies).
    pub mode: super::policy::Mode,
    /// Weight of one millisecond of latency in a decision's cost.
    pub latency_weight: f64,
    /// Weight of one millijoule of the device's energy in a decision's cost.
    pub energy_weight: f64,
    /// A side expected to take longer than this is avoided, ms; 0: no deadline.
    pub deadline_ms: u64,
    /// Longest wait for the coordinator's answer before running the frame locally, ms.
    pub timeout_ms: u64,
    /// Start the local run as well after this long without an answer and take whichever
    /// finishes first, ms; 0: no hedging (wait up to `timeout_ms`).
    pub hedge_ms: u64,
    /// CPU power while inferring and radio/idle power while waiting, for the energy term.
    pub cpu_mw: f64,
    pub idle_mw: f64,
    pub radio_nj_per_byte: f64,
    /// Adaptive mode: exploration strength and the weight old outcomes keep per decision.
    pub exploration: f64,
    pub discount: f64,
    /// A coordinator's capacity advert counts this long after it was received, ms.
    pub advert_max_age_ms: u64,
    /// Requests waiting for answers at once; beyond it frames run locally.
    pub max_pending: u32,
    /// Cost and adaptive modes: measure the link with a small probe when no request did for
    /// this long (at most 1 s during an outage), and run one request locally when the device
    /// did not for this long, ms; 0: never (a side judged worse is then never re-measured).
    pub probe_interval_ms: u64,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        let p = super::policy::PolicyConfig::default();
        OffloadConfig {
            mode: super::policy::Mode::Local,
            latency_weight: p.latency_weight,
            energy_weight: p.energy_weight,
            deadline_ms: 0,
            timeout_ms: 1000,
            hedge_ms: 0,
            cpu_mw: p.cpu_mw,
            idle_mw: p.idle_mw,
            radio_nj_per_byte: p.radio_nj_per_byte,
            exploration: p.exploration,
            discount: p.discount,
            advert_max_age_ms: 30_000,
            max_pending: 64,
            probe_interval_ms: 5000,
        }
    }
}

impl OffloadConfig {
    pub fn policy(&self) -> super::policy::PolicyConfig {
        super::policy::PolicyConfig {
            mode: self.mode,
            latency_weight: self.latency_weight,
            energy_weight: self.energy_weight,
            deadline_ms: self.deadline_ms as f64,
            cpu_mw: self.cpu_mw,
            idle_mw: self.idle_mw,
            radio_nj_per_byte: self.radio_nj_per_byte,
            exploration: self.exploration,
            discount: self.discount,
            refresh_ms: self.probe_interval_ms as f64,
        }
    }

    /// Checks the values serde cannot; the message names the key (`offload.KEY`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let finite_nonneg = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "offload.{name} must be a finite number >= 0, not {v}"
                ))
            }
        };
        finite_nonneg("latency_weight", self.latency_weight)?;
        finite_nonneg("energy_weight", self.energy_weight)?;
        finite_nonneg("cpu_mw", self.cpu_mw)?;
        finite_nonneg("idle_mw", self.idle_mw)?;
        finite_nonneg("radio_nj_per_byte", self.radio_nj_per_byte)?;
        finite_nonneg("exploration", self.exploration)?;
        if self.latency_weight + self.energy_weight <= 0.0 {
            return Err("offload.latency_weight and offload.energy_weight are both 0".into());
        }
        if !(0.5..=1.0).contains(&self.discount) {
            return Err(InvalidSetting(format!(
                "offload.discount must be between 0.5 and 1, not {}",
                self.discount
            )));
        }
        if self.timeout_ms == 0 {
            return Err("offload.timeout_ms must be above 0".into());
        }
        if self.hedge_ms >= self.timeout_ms {
            return Err(InvalidSetting(format!(
                "offload.hedge_ms ({}) must be below offload.timeout_ms ({})",
                self.hedge_ms, self.timeout_ms
            )));
        }
        if self.max_pending == 0 {
            return Err("offload.max_pending must be above 0".into());
        }
        Ok(())
    }
}
