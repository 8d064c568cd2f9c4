//! `edge-coordinator`: the command line around the coordinator library.
//!
//! `serve` runs it (embedded broker by default, `--broker` for an external one);
//! `generate-config` and `check-config` deal with the TOML file; `devices` prints the registry
//! (from the running `serve`'s HTTP API, else from the stopped coordinator's database); `devices pending|approve|reject|revoke` read and
//! decide enrollment requests through the running `serve`'s state directory; `identity` prints
//! the coordinator's public identity (creating it if needed), `identity rotate [--finish]`
//! replaces it through the running `serve` (devices are told with the old key). `keygen` creates a deployment or
//! fleet claim key;
//! `deploy` builds and signs a deployment, spools it for the running `serve` (which sends it
//! and owns the rollout) and draws its progress from the rollout's progress file until every
//! device is final; `deploy --dry-run` only prints the signed manifest. `fl start` validates a
//! federated task and spools it for `serve` (which runs its rounds), `fl status` prints its
//! rounds from the state directory (also while `serve` runs), `fl stop` ends it. `api-token`
//! makes a bearer token for the HTTP API. `logs` and `cmd` send remote commands to a device
//! through the running `serve`'s HTTP API.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_coordinator::config::{self, Config};

use cmd::deploy::{DeployArgs, deploy};
use cmd::devices::{
    DevicesCommand, IdentityCommand, devices, devices_command, identity, identity_command, keygen,
};
use cmd::fl::{FlCommand, fl};
use cmd::serve::{ServeArgs, serve};
use cmd::{StateArgs, report};

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
    /// Print the device registry with each device's enrollment (through the running `serve`'s
    /// HTTP API, or from the database when it is stopped); or list and decide enrollment
    /// requests (while it runs).
    #[command(args_conflicts_with_subcommands = true)]
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
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
    /// Create an ed25519 key (mode 0600) and print its public key: a deployment key (agents
    /// list it in `trusted_keys`) or a fleet claim key (listed in `[[enrollment.claims]]`).
    /// Never overwrites an existing file.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the coordinator's public identity as one JSON line (`{"sign":..,"agree":..}`, what
    /// agents may pin), creating `state_dir/coordinator.key` if it does not exist yet; or
    /// rotate it (`identity rotate`).
    #[command(args_conflicts_with_subcommands = true)]
    Identity {
        #[command(subcommand)]
        command: Option<IdentityCommand>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Build and sign a deployment of a pipeline description and the artifacts it names, or
    /// (`--model NAME=FILE`) of new versions of models in the running pipeline.
    Deploy(Box<DeployArgs>),
    /// Federated learning: start a task, show its rounds, stop it.
    Fl {
        #[command(subcommand)]
        command: FlCommand,
    },
    /// Pause, resume or abort a staged rollout (`deploy --strategy canary`).
    Rollout {
        #[command(subcommand)]
        command: cmd::rollout::RolloutCommand,
    },
    /// Print a device's recent log lines, or follow its log live (through the running
    /// `serve`'s HTTP API; Ctrl-C ends the follow).
    Logs {
        device: String,
        /// Follow new lines as the agent writes them.
        #[arg(long)]
        follow: bool,
        /// Recent lines to print (default 100; with --follow, printed before following).
        #[arg(long)]
        lines: Option<u32>,
        /// Longest the follow runs, seconds (at most 3600).
        #[arg(long = "for", value_name = "SECS", default_value_t = 300)]
        for_s: u64,
        #[command(flatten)]
        remote: cmd::remote::RemoteArgs,
    },
    /// Send a remote command to a device and print its result (through the running `serve`'s
    /// HTTP API; restart-pipeline and log-level need an admin token).
    Cmd {
        device: String,
        #[command(subcommand)]
        command: cmd::remote::CmdCommand,
    },
    /// Make a bearer token for the HTTP API: prints the token once (stderr says so) and the
    /// `[[api.tokens]]` table holding only its sha256, for the config file.
    ApiToken {
        /// A name for the token, logged with admin requests.
        #[arg(long)]
        name: String,
        /// What the token may do.
        #[arg(long, value_enum, default_value = "read")]
        scope: edge_coordinator::api::Scope,
    },
}

fn api_token(name: &str, scope: edge_coordinator::api::Scope) -> anyhow::Result<()> {
    use edge_coordinator::api::config::{new_token, token_digest};
    anyhow::ensure!(
        !name.is_empty() && !name.contains(['"', '\\', '\n']),
        "invalid token name {name:?}: must be non-empty, without quotes, backslashes or newlines"
    );
    let token = new_token();
    eprintln!("token (shown once; only its sha256 goes into the config):");
    println!("{token}");
    eprintln!("add to the coordinator's config and restart serve:");
    println!(
        "\n[[api.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscope = \"{}\"",
        token_digest(&token),
        scope.as_str()
    );
    Ok(())
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
            command: Some(command),
            ..
        } => report(devices_command(command)),
        Command::Devices {
            command: None,
            state_dir,
            config,
            json,
        } => report(devices(state_dir, config, json)),
        Command::Keygen { out } => report(keygen(&out)),
        Command::Identity {
            command: Some(command),
            ..
        } => report(identity_command(command)),
        Command::Identity {
            command: None,
            state,
        } => report(identity(state)),
        Command::Deploy(args) => report(deploy(*args)),
        Command::Fl { command } => report(fl(command)),
        Command::Rollout { command } => report(cmd::rollout::rollout(command)),
        Command::ApiToken { name, scope } => report(api_token(&name, scope)),
        Command::Logs {
            device,
            follow,
            lines,
            for_s,
            remote,
        } => report(cmd::remote::logs(&device, follow, lines, for_s, remote)),
        Command::Cmd { device, command } => report(cmd::remote::cmd(&device, command)),
    }
}
