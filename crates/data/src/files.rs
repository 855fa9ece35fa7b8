//! Writing files and folders so that a reader, or a run killed half-way, never sees a part:
//! the new content is written under a temporary name beside its destination and renamed
//! into place in one step.

use std::io;
use std::path::{Path, PathBuf};

/// A file or folder being written under a temporary name (`.NAME.tmp-PID` beside `dest`);
/// [`Staged::commit`] renames it over `dest`. Dropped without a commit, it is removed.
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staged {
    /// Prepares to write `dest`; a temporary left by an earlier process of this id is removed.
    pub fn new(dest: &Path) -> io::Result<Staged> {
        let name = dest.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
        let tmp = dest.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        remove(&tmp)?;
        Ok(Staged { tmp, dest: dest.to_path_buf(), committed: false })
    }

    /// Where to write the new content.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Where the content goes on commit.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Puts the new content in place by one rename: a file replaces a file; a folder takes
    /// the place of nothing or of an empty folder, and fails where a folder with content
    /// is in the way (of two writers racing, the second fails).
    pub fn commit(mut self) -> io::Result<()> {
        std::fs::rename(&self.tmp, &self.dest)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove(&self.tmp);
        }
    }
}

/// Removes a file or folder if it exists.
fn remove(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `content` to `path` by a rename, so readers see the old or the new content.
pub fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    let staged = Staged::new(path)?;
    std::fs::write(staged.path(), content)?;
    staged.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_content_appears_only_on_commit_and_is_removed_when_dropped() {
        let dir = std::env::temp_dir().join(format!("pg2-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("latest");
        write_atomically(&file, b"old").unwrap();

        let staged = Staged::new(&file).unwrap();
        std::fs::write(staged.path(), b"half").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"old", "nothing changes before the commit");
        let tmp = staged.path().to_path_buf();
        drop(staged);
        assert!(!tmp.exists(), "an uncommitted temporary is removed");
        assert_eq!(std::fs::read(&file).unwrap(), b"old");

        let folder = dir.join("step-000001");
        for (content, lands) in [("first", true), ("second", false)] {
            let staged = Staged::new(&folder).unwrap();
            std::fs::create_dir_all(staged.path()).unwrap();
            std::fs::write(staged.path().join("w"), content).unwrap();
            assert_eq!(staged.commit().is_ok(), lands, "a folder with content is never replaced");
            assert_eq!(std::fs::read_to_string(folder.join("w")).unwrap(), "first");
        }
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "no temporaries are left: {left:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
