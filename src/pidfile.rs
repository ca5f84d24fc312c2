//! Questions a client asks about a daemon's process from outside: which daemon holds a PID
//! file's lock, and whether a process is alive. The daemon's own start-up, which takes the
//! lock, is in `instance`; this module never touches the socket or writes a file.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::Path;
use std::time::Duration;

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::error::annotate;

/// Whether a process with this id exists (a signal-0 probe). PID 0 and ids that do not fit
/// an `i32` are never running; a process of another user counts as running.
///
/// A PID alone says little: the number of a daemon that died may have been given to any other
/// process since. Ask [`running_pid`] which daemon holds a PID file's lock instead.
///
/// # Examples
///
/// ```
/// assert!(khived::is_process_running(std::process::id()));
/// assert!(!khived::is_process_running(0));
/// assert!(!khived::is_process_running(u32::MAX));
/// ```
pub fn is_process_running(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// The PID of the daemon holding the lock on `pid_file`, or `None` if no daemon holds it (the
/// file is missing, or left behind by a daemon that died). A PID file whose lock is free is
/// never trusted, so the PID of a dead daemon, maybe reused since, is never acted on. A lock
/// held while the file names no live process (a daemon in the middle of starting, for a
/// second at most) is an error.
///
/// The daemon holds an exclusive `flock` on its PID file for its whole life (see the crate
/// documentation), so the kernel, not the file's contents, says whether it runs: a lock dies
/// with its process, even one killed with SIGKILL. This function takes a shared lock for two
/// system calls; a daemon starting at that moment retries past it.
///
/// # Errors
///
/// The PID file cannot be opened (other than missing: that is `Ok(None)`) or its lock cannot
/// be inspected, or it is locked while naming no live process; each message names the file.
/// [`io::ErrorKind::PermissionDenied`] if the file is not the user's to trust: it belongs to
/// another user (not root), or a directory on its way does or is writable by group or others
/// without being sticky (the message says which, and the fix). A PID file that is not a
/// regular file is [`io::ErrorKind::InvalidInput`].
///
/// # Examples
///
/// ```no_run
/// match khived::running_pid(&khived::pid_path())? {
///     Some(pid) => println!("running as pid {pid}"),
///     None => println!("not running"),
/// }
/// # std::io::Result::Ok(())
/// ```
pub fn running_pid(pid_file: &Path) -> io::Result<Option<u32>> {
    // Whoever can replace the PID file chooses which process `khived stop` signals.
    crate::trust::check_dirs_of(pid_file)?;
    // Without blocking: a FIFO there must not hang `status` or `stop`. Reads of a regular
    // file never block anyway.
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK;
    let fd = match rustix::fs::open(pid_file, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(annotate(e.into(), "cannot open PID file", pid_file)),
    };
    let stat =
        rustix::fs::fstat(&fd).map_err(|e| annotate(e.into(), "cannot inspect", pid_file))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("PID file {} is not a regular file", pid_file.display()),
        ));
    }
    let euid = rustix::process::geteuid().as_raw();
    if stat.st_uid != euid && stat.st_uid != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "PID file {} belongs to uid {}, neither this user (uid {euid}) nor root; \
                 refusing to believe it (remove it)",
                pid_file.display(),
                stat.st_uid
            ),
        ));
    }
    let mut file = File::from(fd);
    // The lock is looked at again each time the PID is not (yet) a live process: a daemon
    // that is starting has not written its PID yet, and one that is stopping may exit (and
    // let go of the lock) between the two looks.
    for _ in 0..200 {
        // A shared lock is granted only if no daemon holds its exclusive one. It is held for
        // two system calls; a daemon starting at this very moment retries past it.
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                let _ = rustix::fs::flock(&file, FlockOperation::Unlock);
                return Ok(None);
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {}
            Err(e) => return Err(annotate(e.into(), "cannot inspect the lock of", pid_file)),
        }
        if let Some(pid) = read_pid(&mut file).filter(|&pid| is_process_running(pid)) {
            return Ok(Some(pid));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(io::Error::other(format!(
        "{} is locked by a daemon, but names no live process",
        pid_file.display()
    )))
}

/// The lock holder writes its PID soon after locking; until then the file may be empty or
/// name the dead daemon before it, so only a live PID is taken.
pub(crate) fn wait_for_pid(mut file: File) -> Option<u32> {
    for _ in 0..200 {
        if let Some(pid) = read_pid(&mut file).filter(|&pid| is_process_running(pid)) {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

pub(crate) fn read_pid(file: &mut File) -> Option<u32> {
    // A PID and its newline fit in a few bytes; one `read` of a small buffer does without
    // the general read-to-end (1.4 KB of binary). A file longer than that holds no PID.
    let mut buf = [0; 32];
    file.rewind().ok()?;
    let len = file.read(&mut buf).ok()?;
    let text = std::str::from_utf8(buf.get(..len).filter(|_| len < buf.len())?).ok()?;
    text.trim().parse().ok().filter(|&pid| pid != 0)
}
