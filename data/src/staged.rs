//! Directories that appear complete or not at all: written under a hidden sibling name, fsynced,
//! then renamed into place. Shared by datasets, model exports and checkpoints.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A directory being written; dropped without [`StagedDir::commit`], it is removed.
pub struct StagedDir {
    staging: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Starts writing what will become `out`, which must not exist.
    pub fn begin(out: &Path) -> Result<Self> {
        if out.exists() {
            bail!("{} already exists; choose a new output directory", out.display());
        }
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let name = out.file_name().context("output path has no file name")?.to_string_lossy();
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        Ok(Self { staging, out: out.to_path_buf(), committed: false })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Writes and fsyncs one file.
    pub fn write(&self, file: &str, contents: impl AsRef<[u8]>) -> Result<()> {
        let path = self.staging.join(file);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        std::fs::File::open(&path)?.sync_all()?;
        Ok(())
    }

    /// Fsyncs the directory and renames it into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        std::fs::File::open(&self.staging)?.sync_all()?;
        std::fs::rename(&self.staging, &self.out)
            .with_context(|| format!("renaming {} to {}", self.staging.display(), self.out.display()))?;
        if let Some(parent) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)?.sync_all()?;
        }
        self.committed = true;
        Ok(self.out.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// The sha256 of a file, hex-encoded, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(format!("{:x}", hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}
