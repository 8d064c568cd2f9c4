//! Host-side bindings of the `stage` world of `edge:pipeline@0.1.0`, generated from
//! `modules/wit/`: the single definition of the guest ABI, shared with the guests' SDK.

wasmtime::component::bindgen!({
    world: "stage",
    path: "../modules/wit",
    // Frames are compared in tests and by pipeline code (e.g. passthrough checks).
    additional_derives: [PartialEq],
});
