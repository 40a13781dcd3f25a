use anyhow::Result;
use metapeft::data::datasets::{self, TASKS};

#[derive(clap::Args)]
pub struct Args {
    /// Also load every dataset to print its split sizes (a few seconds)
    #[arg(long)]
    sizes: bool,
    /// List the task families `prepare --family` takes, with their task-level splits
    #[arg(long)]
    families: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dir = metapeft::assets::data_dir();
    println!("datasets directory: {}", dir.display());
    if a.families {
        for (name, what) in metapeft::data::family::FAMILIES {
            println!("{name:<16} {what}");
            let f = metapeft::data::family::load(name, &dir)?;
            let names = |v: &[metapeft::data::family::FamilyTask]| {
                v.iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "  meta-train ({}): {}",
                f.meta_train.len(),
                names(&f.meta_train)
            );
            println!(
                "  meta-valid ({}): {}",
                f.meta_valid.len(),
                names(&f.meta_valid)
            );
            println!(
                "  meta-test  ({}): {}",
                f.meta_test.len(),
                names(&f.meta_test)
            );
        }
        return Ok(());
    }
    for (name, what) in TASKS {
        if !a.sizes {
            println!("{name:<22} {what}");
            continue;
        }
        let expanded: Vec<String> = match name {
            "wikiann/<lang>" => ["en", "de", "fr", "nl"]
                .iter()
                .map(|l| format!("wikiann/{l}"))
                .collect(),
            "fortunes/<category>" => {
                let mut v: Vec<String> = std::fs::read_dir(dir.join("lm/fortunes"))
                    .map(|r| {
                        r.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| n != "COPYRIGHT")
                            .map(|n| format!("fortunes/{n}"))
                            .collect()
                    })
                    .unwrap_or_default();
                v.sort();
                v
            }
            n => vec![n.to_string()],
        };
        for n in expanded {
            match datasets::load(&n, &dir, false) {
                Ok(ds) => {
                    let sizes: Vec<String> = ds
                        .splits
                        .iter()
                        .map(|(k, v)| format!("{k} {}", v.len()))
                        .collect();
                    let groups = ds.groups().len();
                    let g = if groups > 1 {
                        format!(", {groups} groups")
                    } else {
                        String::new()
                    };
                    println!("{n:<22} {:?}: {}{g}", ds.kind, sizes.join(", "));
                }
                Err(e) => println!("{n:<22} unavailable: {e}"),
            }
        }
    }
    Ok(())
}
