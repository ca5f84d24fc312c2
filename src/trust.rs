//! Whom the daemon and its clients trust: directories that only the user (or root) can
//! change, and a process at the other end of the socket that runs as the user (or root).
//!
//! Anyone who can write to a directory on the way to the socket can rename the directory
//! below it away and put a socket of their own in its place; anyone who can write to the
//! socket's own directory can also replace the socket or plant a symbolic link there. So the
//! daemon refuses such directories before it creates anything, clients refuse them before
//! they connect, and clients then check who serves the socket before they send a byte.
//! Both sides use these same checks, so a client never creates a file (the spawn lock, the
//! daemon's log) where the daemon would refuse to run.

use std::fs::{self, Metadata};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::state_dir;
use crate::error::annotate;

/// Creates the directory that will hold `file` (mode 0700) and checks that only we can
/// write to it, and that only we or root can change any directory on the way to it.
///
/// The daemon's own default state directory is ours to fix (set to 0700 if others can
/// write to it); any other directory is only refused, with the command that fixes it.
pub(crate) fn prepare_dir(file: &Path) -> io::Result<()> {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Before anything is created: a directory made below an ancestor that others control
    // would be theirs to move away.
    check_ancestors(dir, false, file)?;
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| annotate(e, "cannot create", dir))?;
        // The mode given to mkdir is filtered by the umask; set it exactly.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| annotate(e, "cannot set permissions on", dir))?;
    }
    let meta = fs::metadata(dir).map_err(|e| annotate(e, "cannot inspect", dir))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", dir.display()),
        ));
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing to use {}: it is owned by uid {}, not by this user (uid {euid}); \
                 choose a directory of your own (KHIVE_SOCKET, KHIVE_PID)",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        if dir == state_dir() {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| annotate(e, "cannot set permissions on", dir))?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refusing to use {}: it is writable by group or others (mode {mode:04o}); \
                     fix it with `chmod 700 {}`",
                    dir.display(),
                    dir.display()
                ),
            ));
        }
    }
    // Now that it exists: the directories a symbolic link to it leads through.
    check_ancestors(dir, true, file)
}

/// What a client checks before it connects to a socket or believes a PID file: the file's
/// directory and every directory above it belong to the user or root and are not writable
/// by group or others, unless sticky (like `/tmp`, where others may add files but not move
/// ours).
pub(crate) fn check_dirs_of(file: &Path) -> io::Result<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => check_ancestors(dir, true, file),
        _ => check_ancestors(Path::new("."), true, file),
    }
}

/// Checks each existing directory from `dir` (itself only if `with_dir`; a symbolic link
/// there is followed either way) up to `/`: on the path as written, through each symbolic
/// link on the way (a link is only as safe as the directories its target lies in), and on
/// the path all the links lead to. Missing ones are skipped: the daemon creates them, mode
/// 0700.
fn check_ancestors(dir: &Path, with_dir: bool, file: &Path) -> io::Result<()> {
    let euid = rustix::process::geteuid().as_raw();
    let mut links = 0;
    let deepest = check_written(dir, with_dir, file, euid, &mut links)?;
    // Without links and `..` the path as written is the real one: no need to resolve it.
    let dotdot = dir
        .components()
        .any(|c| c == std::path::Component::ParentDir);
    let resolve = deepest.filter(|_| links > 0 || dotdot || dir.is_relative());
    if let Some(real) = resolve.and_then(|dir| fs::canonicalize(dir).ok()) {
        for ancestor in real.ancestors() {
            let meta =
                fs::metadata(ancestor).map_err(|e| annotate(e, "cannot inspect", ancestor))?;
            check_one(ancestor, &meta, euid, file)?;
        }
    }
    Ok(())
}

/// The path as written, following each symbolic link's target in turn (counted in
/// `links`); returns the deepest directory that exists.
fn check_written(
    dir: &Path,
    with_dir: bool,
    file: &Path,
    euid: u32,
    links: &mut u32,
) -> io::Result<Option<PathBuf>> {
    // As the kernel's own limit on links followed in one lookup.
    if *links > 40 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("too many symbolic links on the way to {}", file.display()),
        ));
    }
    let absolute = std::path::absolute(dir).map_err(|e| annotate(e, "cannot resolve", dir))?;
    let mut deepest = None;
    for (i, ancestor) in absolute.ancestors().enumerate() {
        // Dangling or not, `dir` itself included: what would be created through a link lies
        // below its target.
        if fs::symlink_metadata(ancestor).is_ok_and(|meta| meta.file_type().is_symlink()) {
            let target =
                fs::read_link(ancestor).map_err(|e| annotate(e, "cannot read", ancestor))?;
            let parent = ancestor.parent().unwrap_or(Path::new("/"));
            *links += 1;
            check_written(&parent.join(target), true, file, euid, links)?;
        }
        if i == 0 && !with_dir {
            continue;
        }
        let meta = match fs::metadata(ancestor) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(annotate(e, "cannot inspect", ancestor)),
        };
        check_one(ancestor, &meta, euid, file)?;
        deepest.get_or_insert_with(|| ancestor.to_owned());
    }
    Ok(deepest)
}

fn check_one(dir: &Path, meta: &Metadata, euid: u32, file: &Path) -> io::Result<()> {
    let uid = meta.uid();
    if uid != euid && uid != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing to use {}: {} is owned by uid {uid}, neither this user (uid {euid}) \
                 nor root, and its owner could replace what is below it; choose a path of \
                 your own (KHIVE_SOCKET, KHIVE_PID) or fix it with `chown {euid} {}`",
                file.display(),
                dir.display(),
                dir.display()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refusing to use {}: {} is writable by group or others (mode {mode:04o}) and \
                 not sticky, so others could move what is below it; fix it with \
                 `chmod go-w {}`",
                file.display(),
                dir.display(),
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Checks, before anything is sent, that the process serving `socket` on this connection
/// runs as this user or as root: anyone else may have put their socket there.
pub(crate) fn check_peer(stream: impl AsFd, socket: &Path) -> io::Result<()> {
    let uid =
        crate::sys::peer_uid(stream).map_err(|e| annotate(e, "cannot tell who serves", socket))?;
    let euid = rustix::process::geteuid().as_raw();
    if uid == euid || uid == 0 {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refusing to talk to {}: the process serving it runs as uid {uid}, neither this \
             user (uid {euid}) nor root; someone else may have put their socket there \
             (check who can write to the directories on its way)",
            socket.display()
        ),
    ))
}
