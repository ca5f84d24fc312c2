//! The trait an application implements to be served.

use std::future::Future;

/// What the daemon serves: the embedding application's request handler.
///
/// The runtime calls [`dispatch`](Dispatch::dispatch) once per request, after checking the
/// request's namespace and configuration id against [`namespace`](Dispatch::namespace) and
/// [`config_id`](Dispatch::config_id). Requests on different connections run concurrently on
/// one thread, so a dispatcher that computes for long should hand the work to a thread of its
/// own and await the answer. A panic inside `dispatch` is caught: the client gets
/// `dispatcher panicked: …` and the daemon keeps serving.
///
/// # Examples
///
/// ```
/// use khived::Dispatch;
///
/// struct Echo;
///
/// impl Dispatch for Echo {
///     async fn dispatch(
///         &self,
///         ops: &str,
///         _presentation: Option<&str>,
///         _presentation_per_op: Option<&[Option<String>]>,
///     ) -> Result<String, String> {
///         Ok(ops.to_owned())
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
    /// Answers one request: `Ok(result)` or `Err(message)`, both sent back as strings.
    fn dispatch(
        &self,
        ops: &str,
        presentation: Option<&str>,
        presentation_per_op: Option<&[Option<String>]>,
    ) -> impl Future<Output = Result<String, String>> + Send;

    /// Warms caches and indexes. It runs in the background once the socket is bound, while
    /// requests are already being served. The default does nothing.
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
