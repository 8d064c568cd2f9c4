//! `edge-coordinator`: the command line around the coordinator library.
//!
//! `serve` runs it (embedded broker by default, `--broker` for an external one);
//! `generate-config` and `check-config` deal with the TOML file; `devices` prints the persisted
//! registry while the coordinator is stopped. `keygen` creates a deployment signing key;
//! `deploy` builds and signs a deployment, spools it for the running `serve` (which sends it
//! and owns the rollout) and draws its progress from the rollout's progress file until every
//! device is final; `deploy --dry-run` only prints the signed manifest. `fl start` validates a
//! federated task and spools it for `serve` (which runs its rounds), `fl status` prints its
//! rounds from the state directory (also while `serve` runs), `fl stop` ends it.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_coordinator::config::{self, Config};

use cmd::deploy::{DeployArgs, deploy};
use cmd::devices::{devices, keygen};
use cmd::fl::{FlCommand, fl};
use cmd::report;
use cmd::serve::{ServeArgs, serve};

#[derive(Debug, Parser)]
#[command(
    name = "edge-coordinator",
    version,
    about = "Cloud coordinator for edge agents: MQTT broker, device registry, telemetry and data journal"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator until SIGINT/SIGTERM.
    Serve(Box<ServeArgs>),
    /// Print the commented default configuration.
    GenerateConfig,
    /// Check a configuration file; errors name the key and its line.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print the persisted device registry (the coordinator must not be running).
    Devices {
        /// State directory; defaults to the one in --config, or the built-in default.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Configuration file to take state_dir from.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON (one array of full records) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create an ed25519 deployment signing key (mode 0600) and print its public key, the
    /// value agents list in `trusted_keys`. Never overwrites an existing file.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Build and sign a deployment of a pipeline description and the artifacts it names, or
    /// (`--model NAME=FILE`) of new versions of models in the running pipeline.
    Deploy(DeployArgs),
    /// Federated learning: start a task, show its rounds, stop it.
    Fl {
        #[command(subcommand)]
        command: FlCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::GenerateConfig => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                // Printed whole: the toml message spans lines (position, excerpt, caret).
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Devices {
            state_dir,
            config,
            json,
        } => report(devices(state_dir, config, json)),
        Command::Keygen { out } => report(keygen(&out)),
        Command::Deploy(args) => report(deploy(args)),
        Command::Fl { command } => report(fl(command)),
    }
}
