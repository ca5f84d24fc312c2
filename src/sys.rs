//! The few system calls whose spelling differs between Linux and the other Unixes, so that
//! the platform `cfg`s live in this one file.
//!
//! Linux (and Android) create and accept sockets close-on-exec and non-blocking in one call
//! (`SOCK_CLOEXEC`, `accept4`), suppress `SIGPIPE` per send (`MSG_NOSIGNAL`), tell a peer's
//! uid with `SO_PEERCRED`, and have a service manager that passes sockets and takes readiness
//! notifications (`systemd`). Elsewhere (macOS; the BSDs take the same path):
//!
//! - Close-on-exec and non-blocking are set with `fcntl` and `ioctl(FIONBIO)` right after the
//!   socket is created or accepted. A child started by another thread in that moment would
//!   inherit the descriptor and hold the socket open until it exits; the standard library's
//!   own sockets have the same window on these systems.
//! - `SIGPIPE` is suppressed with `MSG_NOSIGNAL` where it exists. Apple platforms lack it:
//!   there `SO_NOSIGPIPE` is set once per socket, so every socket given to [`send`] must have
//!   passed [`no_sigpipe`] (those from [`accept`] and [`unix_socket`] have).
//! - The peer's uid comes from `getpeereid`, which rustix lacks: the one `unsafe` call in
//!   this file, through `libc`.
//! - Socket paths are shorter ([`MAX_SOCKET_PATH`]).
//! - There is no service manager to speak to: `no_service_manager` stands in for the
//!   `systemd` module.

use std::io;
use std::os::unix::net::UnixListener;

use rustix::fd::{AsFd, OwnedFd};
use rustix::net::{AddressFamily, SendFlags, SocketType};

/// The longest socket path the platform accepts, in bytes (`sun_path` less its NUL).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) const MAX_SOCKET_PATH: usize = 107;
/// The longest socket path the platform accepts, in bytes (`sun_path` less its NUL).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) const MAX_SOCKET_PATH: usize = 103;

#[cfg(not(target_vendor = "apple"))]
const NO_SIGPIPE: SendFlags = SendFlags::NOSIGNAL;
// The socket itself carries `SO_NOSIGPIPE` (see `no_sigpipe`).
#[cfg(target_vendor = "apple")]
const NO_SIGPIPE: SendFlags = SendFlags::empty();

/// Sends without ever raising `SIGPIPE`: a peer that is gone is an `EPIPE` error. A library
/// cannot count on its embedder (or libFuzzer's `main`) ignoring the signal as Rust's `main`
/// does.
pub(crate) fn send(socket: impl AsFd, bytes: &[u8]) -> rustix::io::Result<usize> {
    rustix::net::send(socket, bytes, NO_SIGPIPE)
}

/// Makes [`send`] on `socket` safe from `SIGPIPE` where the flag that [`send`] passes does
/// not exist (Apple platforms); does nothing elsewhere.
#[cfg(any(
    feature = "__fuzzing",
    not(any(target_os = "linux", target_os = "android"))
))]
pub(crate) fn no_sigpipe(socket: impl AsFd) -> io::Result<()> {
    #[cfg(target_vendor = "apple")]
    rustix::net::sockopt::set_socket_nosigpipe(socket, true)?;
    #[cfg(not(target_vendor = "apple"))]
    let _ = socket;
    Ok(())
}

/// Makes `connect` to the listener fail with "connection refused" from now on, while the
/// connections already queued can still be accepted: what a Linux listening socket shut down
/// for reading does. False where the system has no such thing (the listener is unchanged).
pub(crate) fn refuse_connections(listener: &UnixListener) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    return rustix::net::shutdown(listener, rustix::net::Shutdown::Read).is_ok();
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = listener;
        false
    }
}

/// Accepts a connection, close-on-exec and non-blocking.
pub(crate) fn accept(listener: &UnixListener) -> io::Result<OwnedFd> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::net::SocketFlags;
        // `accept4` with the flags set saves an `fcntl` per connection.
        Ok(rustix::net::accept_with(
            listener,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        )?)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let fd = rustix::net::accept(listener)?;
        finish(&fd, true)?;
        Ok(fd)
    }
}

/// A new Unix stream socket, close-on-exec, blocking unless `nonblocking`.
pub(crate) fn unix_socket(nonblocking: bool) -> io::Result<OwnedFd> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::net::SocketFlags;
        let mut flags = SocketFlags::CLOEXEC;
        if nonblocking {
            flags |= SocketFlags::NONBLOCK;
        }
        Ok(rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            flags,
            None,
        )?)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None)?;
        finish(&fd, nonblocking)?;
        Ok(fd)
    }
}

/// Sets what Linux sets when it creates a socket: close-on-exec, non-blocking if asked, and
/// no `SIGPIPE` (set on an accepted socket too: which options it inherits from the listener
/// differs between systems).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn finish(fd: &OwnedFd, nonblocking: bool) -> io::Result<()> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    if nonblocking {
        rustix::io::ioctl_fionbio(fd, true)?;
    }
    no_sigpipe(fd)
}

/// The effective uid of the process at the other end, as the kernel recorded it at
/// `connect` (or at `listen`, seen from a client).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn peer_uid(stream: impl AsFd) -> io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(stream)?.uid.as_raw())
}

/// The effective uid of the process at the other end, as the kernel recorded it at
/// `connect` (or at `listen`, seen from a client).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[allow(unsafe_code)]
pub(crate) fn peer_uid(stream: impl AsFd) -> io::Result<u32> {
    use rustix::fd::AsRawFd;
    let fd = stream.as_fd();
    let mut uid: libc::uid_t = 0;
    let mut gid: libc::gid_t = 0;
    // SAFETY: `getpeereid` reads nothing but the descriptor, which `fd` keeps open for the
    // duration of the call, and writes one `uid_t` and one `gid_t` through pointers to the
    // two locals above, which are valid, aligned and writable. It keeps no pointer after it
    // returns. rustix has no wrapper for this call.
    let rc = unsafe { libc::getpeereid(fd.as_raw_fd(), &mut uid, &mut gid) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(uid)
}

/// What stands in for the `systemd` module where there is no systemd: socket activation and
/// readiness notification speak its protocol (`LISTEN_FDS`, `NOTIFY_SOCKET`), which macOS's
/// launchd and the BSDs' rc systems do not. The daemon always binds its own socket there,
/// whatever [`Config::socket_activation`](crate::Config::socket_activation) says, and
/// notifies nobody.
#[cfg(not(target_os = "linux"))]
pub(crate) mod no_service_manager {
    use std::io;
    use std::os::unix::net::UnixListener;

    /// Never a listener: socket activation is off on this platform.
    pub(crate) fn inherited_listener() -> io::Result<Option<UnixListener>> {
        Ok(None)
    }

    /// Never made: there is no service manager to notify.
    #[derive(Debug)]
    pub(crate) enum Notifier {}

    impl Notifier {
        /// Always `None`.
        pub(crate) fn from_env() -> Option<Notifier> {
            None
        }

        /// Cannot be called: no `Notifier` exists.
        pub(crate) fn notify(&self, _state: &str) {
            match *self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use rustix::fs::OFlags;
    use rustix::io::FdFlags;

    use super::*;

    fn close_on_exec(fd: impl AsFd) -> bool {
        rustix::io::fcntl_getfd(fd)
            .unwrap()
            .contains(FdFlags::CLOEXEC)
    }

    fn nonblocking(fd: impl AsFd) -> bool {
        rustix::fs::fcntl_getfl(fd)
            .unwrap()
            .contains(OFlags::NONBLOCK)
    }

    #[test]
    fn new_sockets_are_close_on_exec_and_nonblocking_as_asked() {
        for asked in [false, true] {
            let fd = unix_socket(asked).unwrap();
            assert!(close_on_exec(&fd));
            assert_eq!(nonblocking(&fd), asked);
        }
    }

    #[test]
    fn accepted_sockets_are_close_on_exec_nonblocking_and_know_their_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        // The connection is already queued: a blocking listener returns it at once.
        let accepted = accept(&listener).unwrap();
        assert!(close_on_exec(&accepted));
        assert!(nonblocking(&accepted));
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(peer_uid(&accepted).unwrap(), me);
        assert_eq!(peer_uid(&client).unwrap(), me);
        // A peer that is gone is an error, not a signal (the test harness ignores SIGPIPE
        // anyway; what this shows is that the error comes back).
        drop(client);
        let sent = send(&accepted, b"x");
        assert_eq!(sent, Err(rustix::io::Errno::PIPE));
    }
}
