//! The trait an application implements to be served, and the error it may return.

use std::fmt;
use std::future::Future;

use crate::wire::{code, Disposition, ErrorDetail, Request};

/// What the daemon serves: the embedding application's request handler.
///
/// The runtime calls [`dispatch`](Dispatch::dispatch) once per request, after checking the
/// request's protocol version, namespace and configuration id against its own,
/// [`namespace`](Dispatch::namespace) and [`config_id`](Dispatch::config_id) (PROTOCOL.md,
/// "One request, in order"). The dispatcher sees the whole [`Request`]: it reads the fields
/// it needs (`ops`, `presentation`, …), and a field added to the protocol later breaks no
/// implementation. A dispatcher may compute inline: while it does, other requests are served
/// by other threads, up to [`Config::threads`](crate::Config::threads) computing at once (see
/// the crate documentation for which thread runs what). A dispatch future may be polled on a
/// different thread each time, and is dropped, at its next await point, when the request's
/// deadline passes or its client hangs up. A panic inside `dispatch` is caught: the client gets
/// `dispatcher panicked: …` (code `dispatcher_panicked`) and the daemon keeps serving.
///
/// # Examples
///
/// ```
/// use khived::{Dispatch, DispatchError, Request};
///
/// struct Echo;
///
/// impl Dispatch for Echo {
///     async fn dispatch(&self, request: &Request<'_>) -> Result<String, DispatchError> {
///         if request.ops.is_empty() {
///             return Err("nothing to echo".into());
///         }
///         Ok(request.ops.to_string())
///     }
///
///     fn namespace(&self) -> &str {
///         "echo"
///     }
///
///     fn config_id(&self) -> &str {
///         ""
///     }
/// }
/// ```
pub trait Dispatch: Send + Sync + 'static {
    /// Answers one request: `Ok(result)`, sent back as the response's `result`, or an error,
    /// sent back as its `error` text and `error_detail`.
    ///
    /// A plain message converts into an error (`Err("no such verb".into())`, code
    /// `dispatcher_error`, outcome unknown); [`DispatchError`] has a code of the dispatcher's
    /// own and a "nothing was changed" mark for the errors that need them.
    fn dispatch(
        &self,
        request: &Request<'_>,
    ) -> impl Future<Output = Result<String, DispatchError>> + Send;

    /// Warms caches and indexes. It runs in the background once the socket is bound, while
    /// requests are already being served (it takes a compute slot like a dispatch, so other
    /// threads serve them while it computes). The default does nothing.
    fn warm_all(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Releases what `warm_all` started (child processes, threads), once the drain is over
    /// (complete or timed out) and before the daemon removes its files and lets go of its PID
    /// file, so that a new daemon cannot start while this one's children still run. The
    /// default does nothing.
    ///
    /// Not called when a second signal forces the stop
    /// ([`Stopped::Forced`](crate::Stopped::Forced)): the daemon then removes its files and
    /// returns at once, and the dispatcher is dropped, so its `Drop` is what runs; whatever
    /// must not outlive the process should also be released there (or be tied to it, as
    /// with `PR_SET_PDEATHSIG`).
    fn shut_down(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The namespace requests must name to be dispatched.
    fn namespace(&self) -> &str;

    /// The fingerprint of the configuration this dispatcher serves; requests must carry the
    /// same one (a missing `config_id` in a request means `""`).
    fn config_id(&self) -> &str;
}

/// An error a [`Dispatch`] returns: a message, a code for programs, and whether the request
/// may have had an effect (PROTOCOL.md, "Errors").
///
/// Made from a message (`"text".into()`, `format!(…).into()` or [`DispatchError::new`]) it
/// has the code [`dispatcher_error`](code::DISPATCHER_ERROR) and the disposition
/// [`Unknown`](Disposition::Unknown): the daemon cannot know what the dispatcher did before
/// it failed. [`with_code`](DispatchError::with_code) and
/// [`not_committed`](DispatchError::not_committed) say more.
///
/// # Examples
///
/// ```
/// use khived::{Disposition, DispatchError};
///
/// let plain: DispatchError = "no such verb".into();
/// assert_eq!(plain.code(), "dispatcher_error");
/// assert_eq!(plain.disposition(), Disposition::Unknown);
///
/// let refused = DispatchError::new("index is rebuilding; try again")
///     .with_code("index_rebuilding")
///     .not_committed();
/// assert_eq!(refused.code(), "index_rebuilding");
/// assert_eq!(refused.disposition(), Disposition::NotCommitted);
/// assert_eq!(refused.to_string(), "index is rebuilding; try again");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchError {
    detail: ErrorDetail,
}

impl DispatchError {
    /// An error with this message, the code `dispatcher_error` and an unknown outcome.
    pub fn new(message: impl Into<String>) -> Self {
        DispatchError {
            detail: ErrorDetail::new(code::DISPATCHER_ERROR, message, Disposition::Unknown),
        }
    }

    /// The same error with a code of the dispatcher's own: a short stable string, such as
    /// `no_such_pack`, that clients may branch on. Use a runtime's code
    /// ([`code`](mod@crate::code)) only when it means exactly that, as the worker pool answers
    /// [`daemon_busy`](code::DAEMON_BUSY) when its queue is full. An empty code is ignored.
    #[must_use]
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        let code = code.into();
        if !code.is_empty() {
            self.detail.code = code;
        }
        self
    }

    /// The same error, declared to have changed nothing: the client may safely send the
    /// request again.
    #[must_use]
    pub fn not_committed(mut self) -> Self {
        self.detail.disposition = Disposition::NotCommitted;
        self
    }

    /// The error's code.
    pub fn code(&self) -> &str {
        &self.detail.code
    }

    /// The error's message, sent as the response's `error`.
    pub fn message(&self) -> &str {
        &self.detail.message
    }

    /// Whether the request may have had an effect.
    pub fn disposition(&self) -> Disposition {
        self.detail.disposition
    }
}

impl From<String> for DispatchError {
    fn from(message: String) -> Self {
        DispatchError::new(message)
    }
}

impl From<&str> for DispatchError {
    fn from(message: &str) -> Self {
        DispatchError::new(message)
    }
}

impl From<DispatchError> for ErrorDetail {
    fn from(error: DispatchError) -> Self {
        error.detail
    }
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail.message)
    }
}

impl std::error::Error for DispatchError {}
