//! Replacing a run's small files whole: a reader (a resumed run, `lra collect`, a user) sees the
//! old contents or the new ones, never a half-written file, whenever the writer is killed.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary file `path` is written to before it is renamed into place.
pub fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `contents` to `path` through [`temporary`], synced to disk before the rename (so the
/// file survives a power cut too, not only a killed process).
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // A full disk or a read-only folder: leave the old file as it was, and no debris.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("randattn-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("summary.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(temporary(&path), dir.join("summary.json.tmp"));
        // A temporary name that cannot be a file (a folder is in the way): the write fails and
        // the old contents stay.
        std::fs::create_dir_all(temporary(&path).join("x")).unwrap();
        assert!(write_atomic(&path, b"newer").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
