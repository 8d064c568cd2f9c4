//! Execution providers: our own config enum, and the per-model report of which one a model
//! actually runs on and why each preferred one before it was skipped.
//!
//! ort's default is to log a failed registration and silently run on CPU. We register one
//! provider at a time with `error_on_failure`, first with ONNX Runtime's CPU fallback disabled
//! (`session.disable_cpu_ep_fallback`): if that session builds, the provider took every node.
//! If only the session with fallback builds, nodes are split with CPU and the report says so
//! ([`Placement::Partial`]) instead of claiming the accelerator.

use std::fmt;

use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use serde::Deserialize;

/// An execution provider, as named in the agent's config (`inference.providers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// NVIDIA TensorRT (Jetson, desktop GPUs); needs the onnxruntime-gpu build and TensorRT.
    Tensorrt,
    /// NVIDIA CUDA; needs the onnxruntime-gpu build and the CUDA/cuDNN libraries.
    Cuda,
    /// Qualcomm QNN (Hexagon NPU).
    Qnn,
    /// Rockchip NPU (RK3588-class boards).
    Rknpu,
    /// Arm Compute Library (Cortex-A NEON kernels).
    Acl,
    /// XNNPACK (optimised CPU kernels, common in ARM builds).
    Xnnpack,
    /// Intel OpenVINO.
    Openvino,
    /// ONNX Runtime's default CPU provider; always present.
    Cpu,
}

impl Provider {
    /// Every provider, in the default order of preference.
    pub const ALL: [Provider; 8] = [
        Provider::Tensorrt,
        Provider::Cuda,
        Provider::Qnn,
        Provider::Rknpu,
        Provider::Acl,
        Provider::Xnnpack,
        Provider::Openvino,
        Provider::Cpu,
    ];

    /// The config name (lowercase), also used in telemetry.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Qnn => "qnn",
            Provider::Rknpu => "rknpu",
            Provider::Acl => "acl",
            Provider::Xnnpack => "xnnpack",
            Provider::Openvino => "openvino",
            Provider::Cpu => "cpu",
        }
    }

    /// ONNX Runtime's name for it (as in `GetAvailableProviders`).
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Tensorrt => ep::TensorRT::NAME,
            Provider::Cuda => ep::CUDA::NAME,
            Provider::Qnn => ep::QNN::NAME,
            Provider::Rknpu => ep::RKNPU::NAME,
            Provider::Acl => ep::ACL::NAME,
            Provider::Xnnpack => ep::XNNPACK::NAME,
            Provider::Openvino => ep::OpenVINO::NAME,
            Provider::Cpu => ep::CPU::NAME,
        }
    }

    /// Whether the loaded library was built with this provider (says nothing about whether
    /// its device and libraries are there).
    pub(crate) fn is_built_in(self) -> Result<bool, ort::Error> {
        match self {
            Provider::Tensorrt => ep::TensorRT::is_available(),
            Provider::Cuda => ep::CUDA::is_available(),
            Provider::Qnn => ep::QNN::is_available(),
            Provider::Rknpu => ep::RKNPU::is_available(),
            Provider::Acl => ep::ACL::is_available(),
            Provider::Xnnpack => ep::XNNPACK::is_available(),
            Provider::Openvino => ep::OpenVINO::is_available(),
            Provider::Cpu => Ok(true),
        }
    }

    /// Registration that fails loudly instead of ort's log-and-continue.
    pub(crate) fn dispatch(self) -> ExecutionProviderDispatch {
        let d = match self {
            Provider::Tensorrt => ep::TensorRT::default().build(),
            Provider::Cuda => ep::CUDA::default().build(),
            Provider::Qnn => ep::QNN::default().build(),
            Provider::Rknpu => ep::RKNPU::default().build(),
            Provider::Acl => ep::ACL::default().build(),
            Provider::Xnnpack => ep::XNNPACK::default().build(),
            Provider::Openvino => ep::OpenVINO::default().build(),
            Provider::Cpu => ep::CPU::default().build(),
        };
        d.error_on_failure()
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a model's nodes run on the chosen provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The provider took every node (the session built with CPU fallback disabled).
    Full,
    /// Some nodes run on the CPU provider (the session only built with fallback allowed).
    Partial,
}

/// A preferred provider that was passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub provider: Provider,
    /// Human-readable, e.g. "not built into libonnxruntime 1.32.0 (it has: CPUExecutionProvider)".
    pub reason: String,
}

/// Which provider a model actually runs on, and why each preferred one before it was not used.
/// The agent puts this in its registration and telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderReport {
    pub provider: Provider,
    pub placement: Placement,
    /// The providers listed before `provider` in the config, in order.
    pub skipped: Vec<Skipped>,
}

impl fmt::Display for ProviderReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.provider)?;
        if self.placement == Placement::Partial {
            f.write_str(" (some nodes on cpu)")?;
        }
        for s in &self.skipped {
            write!(f, "; {} skipped: {}", s.provider, s.reason)?;
        }
        Ok(())
    }
}
