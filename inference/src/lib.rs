//! ONNX inference for the edge agent, on ONNX Runtime through `ort` (`load-dynamic`).
//!
//! The facade, in the order the agent uses it:
//!
//! 1. [`Runtime::probe`] finds the library without loading it (what the agent reports until
//!    its first model); [`Runtime::load`] finds and loads `libonnxruntime.so` ([`InferenceConfig::library`],
//!    `ORT_DYLIB_PATH`, next to the executable, the workspace's `target/ort/`). Without it, a
//!    typed [`RuntimeError::Unavailable`] lists every path tried; the agent keeps running WASM
//!    pipelines and reports inference as unavailable.
//! 2. [`ModelRegistry::install`] loads a model on the first preferred [`Provider`] that really
//!    takes it, health-checks it, and swaps it in without dropping requests in flight;
//!    [`Model::provider_report`] says where it runs and why the others were skipped.
//! 3. [`ModelRegistry::run`] / [`Model::run`] take and return [`Tensor`]s, the WIT contract's
//!    tensor record (`modules/wit/types.wit`).
//! 4. [`patch_initializers`] applies new weights (federated learning); [`read_initializers`]
//!    reads them; [`dense_layers`] finds the layers a trainer trains from the graph's structure
//!    ([`trainable_form`] first rewrites skl2onnx's `LinearClassifier` into such layers).
//!
//! Models with weights in external data files (torch's default export) load through
//! [`ModelFiles::read`] and [`Model::load_with_data`] (see [`external`]).
//!
//! [`Batcher`] is the pure batching core of the pipeline's inference stage. Small models for
//! tests and benchmarks come from the dev-only crate `edge-testmodels` (`inference/testmodels`).

mod batcher;
pub mod dense;
pub mod external;
mod linear;
mod model;
pub mod onnx;
mod patch;
mod provider;
mod registry;
mod runtime;
mod tensor;

pub use batcher::Batcher;
pub use dense::{DenseLayer, Layout, NamedWeights, StructureError, dense_layers};
pub use external::{DataFile, DataFiles, ExternalError, ModelFiles};
pub use linear::trainable_form;
pub use model::{IoInfo, Model, ModelError};
pub use patch::{
    PatchError, Sink, UpdateBytes, UpdateSpec, WEIGHTS_FILE, patch_initializers,
    patch_initializers_to_disk, patch_initializers_to_disk_from, patch_initializers_with_data,
    read_initializers,
};
pub use provider::{Placement, Provider, ProviderReport, Skipped};
pub use registry::{Installed, ModelRegistry, RegistryError};
pub use runtime::{Attempt, InferenceConfig, Probe, Runtime, RuntimeError, workspace_library};
pub use tensor::{DType, Tensor, TensorError};
