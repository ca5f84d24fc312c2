//! A log file that cannot fill the disk: [`RotatingFile`] keeps at most a set number of
//! bytes per file and a set number of old files.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags};

/// An append-only file that starts over when it is full: the full file becomes `PATH.1`,
/// `PATH.1` becomes `PATH.2` and so on, and the oldest beyond [`keep`](RotatingFile::keep)
/// is deleted. The disk it uses is bounded by `max_bytes × (keep + 1)`.
///
/// Each `write` call goes whole into one file (cut to `max_bytes` if it is longer), so a log
/// line written with one call is never split across two files. Format a line before writing
/// it: `writeln!` may write it in several calls. One writer per file: two
/// processes rotating the same path would rename each other's files.
///
/// The file is opened safely for a path in a directory others might reach: it is created
/// with mode 0600 if missing, a symbolic link at the path is refused (not followed), and
/// only a regular file is accepted, so a FIFO planted there cannot block the opener.
///
/// # Examples
///
/// ```
/// use std::io::Write;
/// use khived::RotatingFile;
///
/// let dir = std::env::temp_dir().join(format!("rotating-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let mut log = RotatingFile::open(dir.join("daemon.log"))?.max_bytes(64).keep(1);
/// for i in 0..10 {
///     log.write_all(format!("line {i} of the log\n").as_bytes())?;
/// }
/// // Only the newest lines are kept: two files of at most 64 bytes.
/// assert!(std::fs::metadata(dir.join("daemon.log"))?.len() <= 64);
/// assert!(std::fs::metadata(dir.join("daemon.log.1"))?.len() <= 64);
/// assert!(!dir.join("daemon.log.2").exists());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    /// Bytes in the current file, counted from its size at open.
    written: u64,
    /// Whether standard error follows the current file (see `redirect_stderr`).
    stderr: bool,
    /// The full file has moved to `PATH.1` but no new one could be opened yet.
    moved: bool,
}

impl RotatingFile {
    /// The default size at which a file is rotated: 16 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
    /// The default number of old files kept: 2.
    pub const DEFAULT_KEEP: usize = 2;

    /// Opens `path` for appending (creating it with mode 0600), rotating at
    /// [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES) and keeping
    /// [`DEFAULT_KEEP`](Self::DEFAULT_KEEP) old files.
    ///
    /// # Errors
    ///
    /// The file cannot be opened or created, or the path names a symbolic link or something
    /// other than a regular file; the message names the path.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<RotatingFile> {
        let path = path.into();
        let file = open_regular(&path)?;
        let written = file.metadata()?.len();
        Ok(RotatingFile {
            path,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            keep: Self::DEFAULT_KEEP,
            file,
            written,
            stderr: false,
            moved: false,
        })
    }

    /// Points the process's standard error (file descriptor 2) at the current file, now and
    /// after every rotation, so what is written to standard error and is not a log record
    /// (a panic's message, a library's `eprintln!`) lands in the newest file beside the
    /// records instead of in a terminal nobody reads or in a renamed `PATH.1`.
    ///
    /// # Errors
    ///
    /// Standard error cannot be replaced (`dup2` fails).
    pub fn redirect_stderr(mut self) -> io::Result<RotatingFile> {
        rustix::stdio::dup2_stderr(&self.file)?;
        self.stderr = true;
        Ok(self)
    }

    /// Sets the size at which the file is rotated (at least 1 byte).
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: u64) -> RotatingFile {
        self.max_bytes = max_bytes.max(1);
        self
    }

    /// The most bytes a file takes before it is rotated.
    pub(crate) fn file_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Sets how many old files are kept; 0 keeps none (a full file is emptied).
    #[must_use]
    pub fn keep(mut self, keep: usize) -> RotatingFile {
        self.keep = keep;
        self
    }

    /// The path of the current file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `PATH.n`, the `n`th oldest rotated file.
    fn old(&self, n: usize) -> PathBuf {
        let mut name = OsString::from(self.path.as_os_str());
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Moves the files one step older and starts an empty current file.
    ///
    /// Should the new file fail to open (out of descriptors, say), the full one has moved to
    /// `PATH.1` already: the next rotation only tries the open again. Moving the files once
    /// more would delete an old one each time, and the rename of a `PATH` that is not there
    /// would fail, so that logging stayed dead once descriptors were back.
    fn rotate(&mut self) -> io::Result<()> {
        if !self.moved {
            self.move_files()?;
            self.moved = true;
        }
        self.file = open_regular(&self.path)?;
        self.moved = false;
        self.written = 0;
        if self.stderr {
            // Without this, standard error would keep writing into the renamed file.
            rustix::stdio::dup2_stderr(&self.file)?;
        }
        Ok(())
    }

    /// Deletes the oldest file and renames the others one step older, `PATH` to `PATH.1`
    /// (or deletes `PATH` if none is kept). A `PATH` that is gone (removed by hand) is no
    /// error: the open after this creates it again.
    fn move_files(&self) -> io::Result<()> {
        let gone_is_fine = |result: io::Result<()>| match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        let _ = std::fs::remove_file(self.old(self.keep.max(1)));
        if self.keep == 0 {
            return gone_is_fine(std::fs::remove_file(&self.path));
        }
        for n in (1..self.keep).rev() {
            gone_is_fine(std::fs::rename(self.old(n), self.old(n + 1)))?;
        }
        gone_is_fine(std::fs::rename(&self.path, self.old(1)))
    }
}

impl Write for RotatingFile {
    /// Writes `buf` whole into the current file, rotating first if it would not fit. A
    /// `buf` longer than a whole file is cut to `max_bytes` (the count returned says so).
    /// If the rotation fails (the new file cannot be opened), nothing is written and the
    /// error is returned; the next write tries the rotation again.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(self.max_bytes);
        if self.written > 0 && self.written + len > self.max_bytes {
            self.rotate()?;
        }
        // `len` is at most `buf.len()`, so it fits in usize.
        let chunk = &buf[..len as usize];
        self.file.write_all(chunk)?;
        self.written += len;
        Ok(chunk.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl fmt::Debug for RotatingFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingFile")
            .field("path", &self.path)
            .field("max_bytes", &self.max_bytes)
            .field("keep", &self.keep)
            .field("written", &self.written)
            .field("stderr", &self.stderr)
            .field("moved", &self.moved)
            .finish()
    }
}

/// Opens `path` for appending, creating it with mode 0600; refuses a symbolic link and
/// anything but a regular file. `O_NONBLOCK` keeps a FIFO at the path from blocking the
/// open; it has no effect on the regular file that is accepted.
fn open_regular(path: &Path) -> io::Result<File> {
    let named = |e: io::Error, what: &str| {
        io::Error::new(
            e.kind(),
            format!("cannot open log file {}: {what}", path.display()),
        )
    };
    let flags = OFlags::WRONLY
        | OFlags::APPEND
        | OFlags::CREATE
        | OFlags::NOFOLLOW
        | OFlags::NONBLOCK
        | OFlags::CLOEXEC
        | OFlags::NOCTTY;
    let fd = match rustix::fs::open(path, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => fd,
        Err(e @ rustix::io::Errno::LOOP) => {
            return Err(named(
                e.into(),
                "it is a symbolic link; remove it or give the real path",
            ))
        }
        // A FIFO without a reader: opened without blocking, and refused like any non-file.
        Err(e @ rustix::io::Errno::NXIO) => {
            return Err(named(
                e.into(),
                "it is not a regular file; remove it or choose another path",
            ))
        }
        Err(e) => {
            let e = io::Error::from(e);
            let why = e.to_string();
            return Err(named(e, &why));
        }
    };
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind != FileType::RegularFile {
        return Err(named(
            io::ErrorKind::InvalidInput.into(),
            "it is not a regular file; remove it or choose another path",
        ));
    }
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::RotatingFile;
    use std::io::Write;

    #[test]
    fn files_stay_bounded_and_the_newest_lines_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.log");
        let mut log = RotatingFile::open(&path).unwrap().max_bytes(100).keep(2);
        for i in 0..1000 {
            let line = format!("line {i:04} xxxxxxxxxxxxxxxxxxxx\n");
            log.write_all(line.as_bytes()).unwrap();
        }
        let names: Vec<_> = ["k.log", "k.log.1", "k.log.2"]
            .iter()
            .map(|name| dir.path().join(name))
            .collect();
        for name in &names {
            let len = std::fs::metadata(name).unwrap().len();
            assert!(len <= 100, "{} has {len} bytes", name.display());
        }
        assert!(!dir.path().join("k.log.3").exists());
        let newest = std::fs::read_to_string(&names[0]).unwrap();
        assert!(
            newest.ends_with("line 0999 xxxxxxxxxxxxxxxxxxxx\n"),
            "{newest}"
        );
        // Lines are never split across files.
        for name in &names {
            let text = std::fs::read_to_string(name).unwrap();
            assert!(text.lines().all(|l| l.len() == 30), "{text:?}");
        }
    }

    #[test]
    fn an_overlong_write_is_cut_and_keep_zero_empties_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.log");
        let mut log = RotatingFile::open(&path).unwrap().max_bytes(10).keep(0);
        assert_eq!(log.write(b"0123456789abcdef").unwrap(), 10);
        log.write_all(b"xyz").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"xyz");
        assert!(!dir.path().join("k.log.1").exists());
    }

    #[test]
    fn an_existing_file_counts_toward_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.log");
        std::fs::write(&path, "old old old\n").unwrap();
        let mut log = RotatingFile::open(&path).unwrap().max_bytes(16);
        log.write_all(b"new new new\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new new new\n");
        assert_eq!(
            std::fs::read(dir.path().join("k.log.1")).unwrap(),
            b"old old old\n"
        );
    }

    #[test]
    fn a_file_removed_by_hand_is_created_again_at_the_next_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.log");
        let mut log = RotatingFile::open(&path).unwrap().max_bytes(16);
        log.write_all(b"first 0123456\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        log.write_all(b"second 012345\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second 012345\n");
        assert!(!dir.path().join("k.log.1").exists());
    }

    #[test]
    fn links_and_fifos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let error = RotatingFile::open(&link).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");

        let fifo = dir.path().join("fifo.log");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Opening does not block on the FIFO (no reader), and refuses it.
        let error = RotatingFile::open(&fifo).unwrap_err().to_string();
        assert!(error.contains("not a regular file"), "{error}");
    }
}
