//! The one error a caller must branch on: another daemon already serving the socket.

use std::fmt;
use std::io;
use std::path::Path;

use crate::logger::program_name;

/// Why a daemon did not start or stopped with an error.
///
/// Messages name the program that embeds the daemon (the file name it was started under),
/// not this crate:
///
/// # Examples
///
/// ```
/// let err = khived::Error::AlreadyRunning { pid: Some(4242) };
/// let program = std::env::args_os().next().unwrap();
/// let program = std::path::Path::new(&program).file_name().unwrap().to_string_lossy();
/// assert_eq!(err.to_string(), format!("{program} is already running as pid 4242"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Another daemon holds the PID file's lock or answers on the socket; none of its files
    /// were touched. `pid` is `None` only if it could not be read in time.
    AlreadyRunning {
        /// The running daemon's process id.
        pid: Option<u32>,
    },
    /// Anything else, with a message that names the path or limit involved.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::AlreadyRunning { pid: Some(pid) } => {
                write!(f, "{} is already running as pid {pid}", program_name())
            }
            Error::AlreadyRunning { pid: None } => {
                write!(
                    f,
                    "{} is already running (its pid could not be read)",
                    program_name()
                )
            }
            Error::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::AlreadyRunning { .. } => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<Error> for io::Error {
    /// `AlreadyRunning` becomes [`io::ErrorKind::AddrInUse`] with the same message.
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            other => io::Error::new(io::ErrorKind::AddrInUse, other.to_string()),
        }
    }
}

/// The same error, with a message that says what was being done to which path.
pub(crate) fn annotate(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}
