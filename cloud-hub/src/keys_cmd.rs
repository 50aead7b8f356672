//! `cloud-hub keys`: ed25519 key pairs for signing bundles and verdicts
//! ([`insp_core::signing`] describes the key files), and `cloud-hub models sign`, which
//! signs a bundle's manifest.

use anyhow::{Context, Result};
use clap::Subcommand;
use insp_core::signing::{self, PrivateKey, PublicKey};
use std::path::{Path, PathBuf};

/// What `cloud-hub keys` does.
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a key pair: DIR/NAME.key (private, mode 0600) and DIR/NAME.pub.
    Generate {
        /// Folder to write the key files into (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// Base name of the files.
        #[arg(long, default_value = "signing")]
        name: String,
    },
    /// The public keys (`*.pub`) in a folder, with their key ids.
    List {
        /// Folder of key files.
        dir: PathBuf,
    },
    /// The public key and key id of a key file (a `.pub`, or a `.key`, whose secret is
    /// never printed): the line devices put in `model.trusted_keys` or `mqtt.hub_keys`.
    Show {
        /// Key file.
        file: PathBuf,
    },
}

/// Runs a `keys` command.
pub fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Generate { out, name } => {
            let (key, private, public) = signing::generate_key_pair(&out, &name)?;
            println!("key id   {}", key.id());
            println!("private  {} (mode 0600: keep it secret)", private.display());
            println!("public   {}", public.display());
            println!("trust it with: {}", key.public().to_text());
        }
        KeysCommand::List { dir } => {
            let mut found = Vec::new();
            let entries = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot read the key folder {}", dir.display()))?;
            for entry in entries {
                let path = entry
                    .with_context(|| format!("cannot read the key folder {}", dir.display()))?
                    .path();
                if path.extension().and_then(|e| e.to_str()) == Some(signing::PUBLIC_SUFFIX) {
                    match PublicKey::read(&path) {
                        Ok(k) => found.push((k.id().to_string(), path, k.to_text())),
                        Err(e) => eprintln!("skipped {}: {e}", path.display()),
                    }
                }
            }
            found.sort();
            let mut t = crate::table::Table::new(&["KEY ID", "FILE", "PUBLIC KEY"]);
            for (id, path, text) in found {
                t.row(vec![id, path.display().to_string(), text]);
            }
            print!("{}", t.render());
        }
        KeysCommand::Show { file } => {
            let public = read_any(&file)?;
            println!("key id   {}", public.id());
            println!("public   {}", public.to_text());
        }
    }
    Ok(())
}

/// The public key of a public or private key file.
fn read_any(file: &Path) -> Result<PublicKey> {
    if file.extension().and_then(|e| e.to_str()) == Some(signing::PRIVATE_SUFFIX) {
        Ok(PrivateKey::read(file)?.public().clone())
    } else {
        Ok(PublicKey::read(file)?)
    }
}

/// `cloud-hub models sign BUNDLE --key KEY`: checks the bundle's files against its
/// manifest and writes `signature.json` over the manifest.
pub fn sign_bundle(bundle: &Path, key: &Path) -> Result<()> {
    let key = PrivateKey::read(key)
        .with_context(|| format!("cannot read the signing key {}", key.display()))?;
    let signature = insp_core::bundle::sign(bundle, &key)
        .with_context(|| format!("cannot sign the bundle {}", bundle.display()))?;
    println!(
        "signed {} with key {} ({})",
        bundle.display(),
        signature.key_id,
        bundle.join(insp_core::bundle::SIGNATURE).display()
    );
    Ok(())
}
