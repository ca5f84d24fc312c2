//! Working under a service manager: an inherited listening socket (socket activation) and
//! readiness notifications (`sd_notify`), both spoken directly, without libsystemd. Linux
//! only: elsewhere `sys::no_service_manager` takes this module's place.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::net::{sockopt, AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FD: i32 = 3;

/// Descriptor 3 is taken at most once per process, whatever the caller does.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening socket the service manager passed us, if `LISTEN_PID` names this process.
///
/// `LISTEN_FDS` must then be 1 and descriptor 3 a listening Unix stream socket; anything else
/// is an error that says what was expected. The `LISTEN_*` variables are removed so that
/// processes we start do not take them for their own.
pub(crate) fn inherited_listener() -> io::Result<Option<UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    if pid
        .as_deref()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        != Some(std::process::id())
    {
        return Ok(None);
    }
    let fds = std::env::var("LISTEN_FDS").unwrap_or_default();
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    if fds.trim() != "1" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "LISTEN_FDS={fds:?}: khived takes exactly one socket (descriptor 3); give the \
                 socket unit a single ListenStream="
            ),
        ));
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other(
            "descriptor 3 was already taken by this process",
        ));
    }
    // SAFETY: LISTEN_PID names this process, so the service manager opened descriptor 3
    // for us and nothing else in the process owns it; TAKEN makes sure it is claimed once.
    #[allow(unsafe_code)]
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    check_listener(fd.as_fd())?;
    // Passed without close-on-exec, as it must be; our children must not inherit it.
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
    rustix::io::ioctl_fionbio(&fd, true)?;
    Ok(Some(UnixListener::from(fd)))
}

fn check_listener(fd: BorrowedFd<'_>) -> io::Result<()> {
    let not_a_listener = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor 3 from the service manager is {what}, not a listening Unix stream socket"),
        )
    };
    let stat = rustix::fs::fstat(fd).map_err(|_| not_a_listener("closed"))?;
    if stat.st_mode & 0o170000 != 0o140000 {
        return Err(not_a_listener("not a socket"));
    }
    if rustix::net::getsockname(fd)?.address_family() != AddressFamily::UNIX {
        return Err(not_a_listener("a socket of another family"));
    }
    if sockopt::socket_type(fd)? != SocketType::STREAM {
        return Err(not_a_listener("not a stream socket"));
    }
    if !sockopt::socket_acceptconn(fd)? {
        return Err(not_a_listener("a socket that is not listening"));
    }
    Ok(())
}

/// Sends state changes to the service manager (`NOTIFY_SOCKET`), if there is one.
#[derive(Debug)]
pub(crate) struct Notifier {
    socket: OwnedFd,
    addr: SocketAddrUnix,
}

impl Notifier {
    /// Reads and removes `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub(crate) fn from_env() -> Option<Notifier> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        std::env::remove_var("NOTIFY_SOCKET");
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddrUnix::new_abstract_name(name),
            None => SocketAddrUnix::new(bytes),
        };
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        );
        match (socket, addr) {
            (Ok(socket), Ok(addr)) => Some(Notifier { socket, addr }),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("NOTIFY_SOCKET={target:?} cannot be used: {e}");
                None
            }
        }
    }

    /// Sends one notification, such as `READY=1\nSTATUS=serving`; failures are logged only.
    pub(crate) fn notify(&self, state: &str) {
        let sent = rustix::net::sendto(
            self.socket.as_fd(),
            state.as_bytes(),
            SendFlags::NOSIGNAL,
            &self.addr,
        );
        if let Err(e) = sent {
            log::warn!("cannot notify the service manager ({state:?}): {e}");
        }
    }
}
