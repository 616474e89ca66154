//! The lock a training run holds on its output folder for its whole lifetime.
//!
//! `{output}/train.lock` names its owner (`pid`, host and start time, one `key=value` a line) and
//! carries an exclusive advisory lock (`flock`), taken without waiting: a second run (another
//! process, or another thread of this one) on the same folder is refused with the owner's pid.
//! The kernel drops the lock when its owner exits, however it exits (kill -9 included), so a lock
//! file left by a dead run is taken over, never trusted; nothing depends on pids not being reused.
//! The file is removed when the [`RunLock`] is dropped, on success and on error alike.
//!
//! Under the lock, the run removes the temporary files that a writer killed mid-write
//! ([`crate::io::write_atomic`]) left in the folder: no other process writes there.

use crate::error::{Error, Result};
use crate::io::remove_atomic_temps;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file in a run's output folder.
pub const LOCK_FILE: &str = "train.lock";

/// How deep below the output folder stale temporary files are looked for: a stage's folder, its
/// checkpoints (`{output}/stage1-x/checkpoint-000010/`).
const TEMP_DEPTH: usize = 2;

/// An output folder held by this run; released (and its file removed) on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    file: File,
}

impl RunLock {
    /// Locks `dir` (created if needed) for this run, then removes the stale temporary files of
    /// [`crate::io::write_atomic`] in it. Errors when another run holds it, naming the folder and
    /// that run's pid.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        // A finishing owner removes the file between our open and our lock: the lock we got is
        // then on a file no longer at `path`, and the next try opens the new one.
        for _ in 0..8 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut owner = String::new();
                    let _ = file.read_to_string(&mut owner);
                    let pid = owner
                        .lines()
                        .find_map(|l| l.strip_prefix("pid="))
                        .unwrap_or("unknown");
                    return Err(Error::arg(
                        "output",
                        format!(
                            "{} is in use by another training run (pid {pid}, lock {}); wait for \
                             it to finish or choose another folder",
                            dir.display(),
                            path.display()
                        ),
                    ));
                }
                Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            if !same_file(&file, &path) {
                continue;
            }
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let started = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let text = format!(
                "pid={}\nhost={}\nstarted={started}\n",
                std::process::id(),
                host.trim()
            );
            file.set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| file.write_all(text.as_bytes()))
                .map_err(|e| Error::io(&path, e))?;
            let lock = RunLock { path, file };
            remove_atomic_temps(dir, TEMP_DEPTH)?;
            return Ok(lock);
        }
        Err(Error::arg(
            "output",
            format!(
                "{} could not be locked: its lock file kept being replaced",
                path.display()
            ),
        ))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still locked, so no one takes over a file about to disappear.
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` still names the open `file`.
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `path` still names the open `file` (without inode numbers: assumed).
#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.is_file()
}
