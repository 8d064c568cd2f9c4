//! `edge-coordinator devices` (the persisted registry) and `keygen` (a deployment signing key).

use std::path::PathBuf;

use anyhow::{Context, Result};
use edge_coordinator::config;
use edge_coordinator::registry;
use edge_coordinator::store::Store;

use super::resolve_state_dir;

pub(crate) fn devices(
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let state_dir = resolve_state_dir(state_dir, config)?;
    // A small cache: this is a one-shot read.
    let store = Store::open_existing(&config::db_path(&state_dir), 8 * 1024 * 1024)?;
    let records = store.load_devices()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&records).context("cannot encode records")?
        );
    } else if records.is_empty() {
        println!("no devices registered in {}", state_dir.display());
    } else {
        print!(
            "{}",
            registry::render_table(&records, protocol::v1::now_ms())
        );
    }
    Ok(())
}

pub(crate) fn keygen(out: &std::path::Path) -> Result<()> {
    let public = edge_coordinator::deploy::generate_key_file(out)?;
    eprintln!(
        "wrote private key {} (mode 0600); add the public key below to the agents' trusted_keys",
        out.display()
    );
    println!("{}", protocol::v1::deploy::public_key_hex(&public));
    Ok(())
}
