//! Cutting a request short: at its deadline, or when its client hangs up. Either way its
//! dispatch future is dropped (smol's cancellation), which stops it at its next await point:
//! a computation that never awaits runs to its end.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_io::Timer;
use futures_lite::future::{self, FutureExt};
use rustix::event::{PollFd, PollFlags, Timespec};

use crate::config::Config;
use crate::connection::after;
use crate::execution::{Execution, Watch};

/// How a dispatch ended.
pub(crate) enum Bounded<T> {
    Done(T),
    /// The request timeout (the value) passed first.
    TimedOut(Duration),
    /// The client hung up first.
    HungUp,
}

/// How to tell that the client of a request has gone.
pub(crate) struct Cut<'a, H> {
    /// Looks once, without waiting (one system call).
    pub(crate) gone: &'a (dyn Fn() -> bool + Sync),
    /// Completes when the client has gone; set up (registered with the reactor) only once
    /// first polled.
    pub(crate) hung_up: H,
}

/// Runs a dispatch on the compute slots until it is done, its deadline passes
/// ([`Config::request_timeout`]) or its client hangs up ([`Config::cancel_on_disconnect`]);
/// in the two last cases the dispatch future is dropped.
///
/// Nothing is set up for a dispatch that finishes in its first poll: a request answered at
/// once costs no timer and no reactor registration. A dispatch that waited for a slot, before
/// or between its polls, is looked at when its turn comes and dropped if its client has gone;
/// the client is watched for only while the dispatch itself waits.
pub(crate) async fn bounded<F: Future, H: Future<Output = ()>>(
    execution: &Arc<Execution>,
    config: &Config,
    dispatch: F,
    cut: Cut<'_, H>,
) -> Bounded<F::Output> {
    let cancel = config.cancel_on_disconnect;
    let deadline = config.request_timeout.map(|limit| (limit, after(limit)));
    let wanted = || !cancel || !(cut.gone)();
    let watch = Watch {
        awaiting: AtomicBool::new(false),
        wanted: &wanted,
    };
    let run = async {
        match execution.compute(dispatch, &watch).await {
            Some(done) => Bounded::Done(done),
            None => Bounded::HungUp,
        }
    };
    let hung_up = async {
        if cancel {
            // Polled after each poll of `run` that did not finish: wait until the dispatch
            // itself waits (not for a slot), then watch the client.
            future::poll_fn(|_| match watch.awaiting.load(Ordering::Relaxed) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            })
            .await;
            cut.hung_up.await;
            Bounded::HungUp
        } else {
            future::pending().await
        }
    };
    let timed_out = async {
        match deadline {
            Some((limit, Some(deadline))) => {
                Timer::at(deadline).await;
                Bounded::TimedOut(limit)
            }
            _ => future::pending().await,
        }
    };
    run.or(hung_up).or(timed_out).await
}

/// What a look at a client's socket tells.
#[derive(PartialEq, Eq)]
enum Peer {
    /// It closed its socket, or the connection was reset.
    Gone,
    /// It sent more, or only shut down its writing side: it may still read the answer.
    There,
    /// Nothing to tell.
    Quiet,
}

fn peer_state(fd: BorrowedFd<'_>) -> Peer {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&now)) {
        Ok(_) if fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR) => Peer::Gone,
        Ok(_) if fds[0].revents().contains(PollFlags::IN) => Peer::There,
        _ => Peer::Quiet,
    }
}

/// Whether the client at the other end of `socket` has closed it (or reset the connection),
/// without reading: one `poll` call. A client that only shut down its writing side has not.
pub(crate) fn peer_gone(socket: impl AsFd) -> bool {
    peer_state(socket.as_fd()) == Peer::Gone
}

/// Completes when the client at the other end of `fd` has gone, waiting with `readable`
/// (the poll of the socket's registration with the reactor). A client that has already sent
/// more (its next request) or only shut down its writing side may still read the answer,
/// and telling more would mean reading: then this never completes. (Not generic over the
/// registration, so that it is compiled in once.)
pub(crate) async fn watch_hang_up(
    fd: BorrowedFd<'_>,
    readable: &(dyn Fn(&mut Context<'_>) -> Poll<io::Result<()>> + Sync),
) {
    loop {
        if future::poll_fn(|cx| readable(cx)).await.is_err() {
            return;
        }
        match peer_state(fd) {
            Peer::Gone => return,
            Peer::There => future::pending().await,
            // Woken without a reason that lasted: look again.
            Peer::Quiet => {}
        }
    }
}
