//! [`ModelRegistry`]: the models an agent has loaded, by name, with hot swap.
//!
//! Invariant: a request never fails because of a swap. `run` clones the model's `Arc` under a
//! read lock held only for that clone, so requests in flight finish on the version they
//! started with; the old session is freed when the last of them drops its `Arc`. A new version
//! is loaded and health-checked before the lock is taken; if either fails, the old version
//! keeps serving.
//! Boundary: the agent's inference stage and model deployment call it; it does no I/O besides
//! ONNX Runtime itself (bytes come from the caller's store).

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::external::DataFiles;
use crate::model::{Model, ModelError};
use crate::runtime::Runtime;
use crate::tensor::Tensor;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("model {0} is not loaded")]
    NotLoaded(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The outcome of [`ModelRegistry::install`].
#[derive(Debug, Clone)]
pub struct Installed {
    pub model: Arc<Model>,
    /// The version it replaced, if any.
    pub replaced: Option<String>,
}

/// Several named models, each swappable while requests run.
#[derive(Debug)]
pub struct ModelRegistry {
    runtime: Runtime,
    models: RwLock<BTreeMap<String, Arc<Model>>>,
}

impl ModelRegistry {
    pub fn new(runtime: Runtime) -> ModelRegistry {
        ModelRegistry {
            runtime,
            models: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Loads `bytes` as `name`@`version`, health-checks it with `probe` (default: zeros with
    /// dynamic dimensions set to 1), and makes it the version that serves `name`.
    pub fn install(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
        probe: Option<&[Tensor]>,
    ) -> Result<Installed, ModelError> {
        self.install_with_data(name, version, bytes, &DataFiles::new(), probe)
    }

    /// [`ModelRegistry::install`] for a model with external data files (see
    /// [`Model::load_with_data`]).
    pub fn install_with_data(
        &self,
        name: &str,
        version: &str,
        bytes: &[u8],
        data: &DataFiles,
        probe: Option<&[Tensor]>,
    ) -> Result<Installed, ModelError> {
        let model = Model::load_with_data(&self.runtime, name, version, bytes, data)?;
        if let Err(e) = model.health_check(probe) {
            tracing::warn!(model = %model.id(), error = %e, "new model version failed its health check; keeping the old one");
            return Err(e);
        }
        let model = Arc::new(model);
        let old = self
            .models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), Arc::clone(&model));
        let replaced = old.as_ref().map(|m| m.version().to_owned());
        if let Some(old) = &replaced {
            tracing::info!(model = %name, from = %old, to = %version, "model swapped");
        }
        // `old` drops here; its session goes when the last in-flight request drops its Arc.
        Ok(Installed { model, replaced })
    }

    /// Makes an already loaded (and checked) `model` the version serving its name: for
    /// callers with checks of their own between [`Model::load`] and the swap (a model
    /// deployment compares the new version's inputs and outputs with the old one's).
    pub fn insert(&self, model: Arc<Model>) -> Installed {
        let old = self
            .models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(model.name().to_owned(), Arc::clone(&model));
        let replaced = old.as_ref().map(|m| m.version().to_owned());
        if let Some(old) = &replaced {
            tracing::info!(model = %model.name(), from = %old, to = %model.version(), "model swapped");
        }
        Installed { model, replaced }
    }

    /// The version serving `name` now.
    pub fn get(&self, name: &str) -> Option<Arc<Model>> {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Runs the current version of `name`.
    pub fn run(&self, name: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RegistryError> {
        let model = self
            .get(name)
            .ok_or_else(|| RegistryError::NotLoaded(name.to_owned()))?;
        Ok(model.run(inputs)?)
    }

    /// Unloads `name` (requests in flight finish first, on their own `Arc`).
    pub fn remove(&self, name: &str) -> bool {
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
            .is_some()
    }

    /// Every loaded model, by name.
    pub fn models(&self) -> Vec<Arc<Model>> {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}
