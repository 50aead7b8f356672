//! `cloud-hub broker passwd|list`: the logins of the embedded broker's password file
//! ([`crate::broker_passwords`]), each change recorded in the hub's audit trail.

use crate::admin_cmd::{actor, DatabaseArgs};
use crate::auth::{random_hex, SecretText};
use crate::broker_passwords::PasswordFile;
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;

/// Random bytes of a generated broker password (hex: twice as many characters).
const PASSWORD_BYTES: usize = 24;

/// `cloud-hub broker ...`.
#[derive(Subcommand, Debug)]
pub enum BrokerCommand {
    /// Give NAME (a device id, or the hub's `mqtt.username`) a new random password in the
    /// password file, printed once with the lines of its configuration; `--delete`
    /// removes the login. The running hub reads the file when it starts: restart it.
    Passwd {
        /// The login (user name).
        name: String,
        /// Remove the login instead.
        #[arg(long)]
        delete: bool,
        /// The password file (default: the hub configuration's
        /// `embedded_broker.password_file`).
        #[arg(long, env = "HUB_BROKER_PASSWORD_FILE")]
        file: Option<PathBuf>,
        /// The hub's configuration and database (the audit trail).
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// The logins in the password file (names only: the file keeps no password).
    List {
        /// The password file (default: the configuration's).
        #[arg(long, env = "HUB_BROKER_PASSWORD_FILE")]
        file: Option<PathBuf>,
        /// The hub's configuration.
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

fn file_of(file: Option<PathBuf>, db: &DatabaseArgs) -> Result<PathBuf> {
    match file {
        Some(f) => Ok(f),
        None => db.resolve()?.embedded_broker.password_file.context(
            "no password file: give --file (HUB_BROKER_PASSWORD_FILE) or set \
             embedded_broker.password_file in the hub's configuration (--config)",
        ),
    }
}

/// Runs a `broker` command.
pub async fn run(command: BrokerCommand) -> Result<()> {
    match command {
        BrokerCommand::Passwd {
            name,
            delete,
            file,
            db,
        } => {
            let path = file_of(file, &db)?;
            let audit = db.open().await?;
            let mut logins = PasswordFile::load(&path, !delete)?;
            if delete {
                anyhow::ensure!(
                    logins.remove(&name),
                    "{name:?} has no login in {}",
                    path.display()
                );
                logins.save(&path)?;
                audit
                    .audit_append(
                        &actor(),
                        "broker.login.delete",
                        serde_json::json!({ "name": name }),
                    )
                    .await?;
                println!("removed {name:?} from {}; restart the hub", path.display());
                return Ok(());
            }
            let password = SecretText::new(random_hex(PASSWORD_BYTES));
            logins.set(&name, &password)?;
            logins.save(&path)?;
            audit
                .audit_append(
                    &actor(),
                    "broker.login.set",
                    serde_json::json!({ "name": name }),
                )
                .await?;
            eprintln!(
                "{name:?} can log in to the embedded broker ({}); its password, shown this once:",
                path.display()
            );
            println!("{}", password.expose());
            eprintln!(
                "on a device: [mqtt] username = {name:?} in edge.toml and the password in \
                 INSP_EDGE__MQTT__PASSWORD; for the hub itself: mqtt.username = {name:?} and \
                 HUB_MQTT_PASSWORD. Restart the hub to load the file."
            );
        }
        BrokerCommand::List { file, db } => {
            let path = file_of(file, &db)?;
            for name in PasswordFile::load(&path, false)?.names() {
                println!("{name}");
            }
        }
    }
    Ok(())
}
