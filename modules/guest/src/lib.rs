//! Guest-side SDK for edge pipeline modules.
//!
//! Generates the bindings for the `stage` world of `edge:pipeline@0.1.0` from
//! `modules/wit/` once, so every module shares them, and adds what each stage needs
//! around them: config parsing with errors that name the bad key ([`config`]), frame and
//! tensor helpers, and one-line logging.
//!
//! A module implements [`Guest`] and exports it with [`export_stage!`]:
//!
//! ```ignore
//! struct MyStage;
//! impl edge_guest::Guest for MyStage {
//!     fn init(config: String) -> Result<(), String> { Ok(()) }
//!     fn process(frame: edge_guest::Frame) -> Result<Vec<edge_guest::Frame>, String> {
//!         Ok(vec![frame])
//!     }
//! }
//! edge_guest::export_stage!(MyStage);
//! ```
//!
//! A stage that keeps state between frames implements [`Stage`] instead and exports it with
//! [`export_stateful_stage!`], which holds the instance built by `init` for `process`.
//!
//! Host imports (`log`, `clock`, `kv`, `counters`) only work inside a component. Compiled
//! natively (unit tests), calling one panics, so keep a module's logic in functions that
//! take and return plain values and test those.

pub mod config;
mod frame;

/// Generated bindings for the `stage` world (everything below is re-exported at the
/// crate root; use these paths only for what is not).
// Generated lowering code passes each flattened field as an argument.
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    // In a module rather than at the crate root: at the root, the `#[macro_export]`ed
    // helper macro collides with its own re-export.
    wit_bindgen::generate!({
        world: "stage",
        path: "../wit",
        // Modules invoke `edge_guest::export_stage!(T)`; the macro finds these bindings here.
        pub_export_macro: true,
        export_macro_name: "export_stage",
        default_bindings_module: "edge_guest::bindings",
        additional_derives: [PartialEq],
    });
}

pub use bindings::edge::pipeline::types::{Dtype, Frame, Payload, Tensor};
pub use bindings::edge::pipeline::{clock, counters, kv, log};
pub use bindings::{Guest, export_stage};
pub use frame::payload_kind;

/// Logs `message` at `level` through the host (see the `log` interface).
pub fn log_at(level: log::Level, message: &str) {
    log::log(level, message);
}

/// Logs at `info`.
pub fn info(message: &str) {
    log::log(log::Level::Info, message);
}

/// Logs at `warn`.
pub fn warn(message: &str) {
    log::log(log::Level::Warn, message);
}

/// Logs at `error`.
pub fn error(message: &str) {
    log::log(log::Level::Error, message);
}

/// A stage with state between frames: built from its config by `init`, then given every frame.
pub trait Stage: Sized + 'static {
    /// Parses the stage's JSON config; the error names the bad key.
    fn from_config(config: &str) -> Result<Self, String>;
    /// Handles one frame (see `process` in the `stage` world).
    fn process(&mut self, frame: Frame) -> Result<Vec<Frame>, String>;
}

/// Exports a [`Stage`] type as the component's `stage` world: `init` builds it, `process`
/// feeds it, and a `process` before a successful `init` is an error.
#[macro_export]
macro_rules! export_stateful_stage {
    ($stage:ty) => {
        ::std::thread_local! {
            // A component instance is single-threaded; the host calls init before process.
            static __EDGE_STAGE: ::std::cell::RefCell<::std::option::Option<$stage>> =
                const { ::std::cell::RefCell::new(None) };
        }

        struct __EdgeComponent;

        impl $crate::Guest for __EdgeComponent {
            fn init(
                config: ::std::string::String,
            ) -> ::std::result::Result<(), ::std::string::String> {
                let stage = <$stage as $crate::Stage>::from_config(&config)?;
                __EDGE_STAGE.with(|s| *s.borrow_mut() = Some(stage));
                Ok(())
            }

            fn process(
                frame: $crate::Frame,
            ) -> ::std::result::Result<::std::vec::Vec<$crate::Frame>, ::std::string::String> {
                __EDGE_STAGE.with(|s| match s.borrow_mut().as_mut() {
                    Some(stage) => <$stage as $crate::Stage>::process(stage, frame),
                    None => Err("process called before init".into()),
                })
            }
        }

        $crate::export_stage!(__EdgeComponent);
    };
}
