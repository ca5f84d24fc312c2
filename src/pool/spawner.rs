//! Where worker processes are forked: one thread that lives as long as the pool.
//!
//! On Linux a worker asks for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`), so that a
//! daemon killed outright leaves no worker behind. The kernel takes "parent" to mean the
//! *thread* that forked the worker, and the daemon's executor runs on threads that come and
//! go (runners leave when they are not needed): a worker forked on a runner was killed when
//! that runner left. Every worker is forked here instead, on a thread that ends only with the
//! pool. Forking, and waiting for the `exec`, off the executor's threads also keeps a slow
//! start from holding up requests.

use std::io;
use std::sync::mpsc;
use std::sync::Mutex;

use async_process::{Child, Command};

use super::dispatcher::lock;

/// A command to start, and where its process goes.
type Order = (Command, async_channel::Sender<io::Result<Child>>);

/// The forking thread, started with the first worker and ended when the pool is dropped
/// (its orders' channel closes).
#[derive(Default)]
pub(super) struct Spawner {
    orders: Mutex<Option<mpsc::Sender<Order>>>,
}

impl Spawner {
    /// Starts `command` on the forking thread.
    pub(super) async fn spawn(&self, command: Command) -> io::Result<Child> {
        let (reply, started) = async_channel::bounded(1);
        self.order((command, reply))?;
        started
            .recv()
            .await
            .map_err(|_| io::Error::other("the pool's thread that starts workers has ended"))?
    }

    fn order(&self, order: Order) -> io::Result<()> {
        let mut orders = lock(&self.orders);
        let sender = match &mut *orders {
            Some(sender) => sender,
            none => {
                let (sender, received) = mpsc::channel::<Order>();
                std::thread::Builder::new()
                    .name("khived-workers".to_owned())
                    .spawn(move || {
                        for (mut command, reply) in received {
                            let _ = reply.try_send(command.spawn());
                        }
                    })?;
                none.insert(sender)
            }
        };
        sender
            .send(order)
            .map_err(|_| io::Error::other("the pool's thread that starts workers has ended"))
    }
}
