//! The smallest complete embedder: a daemon whose answer is the request's `ops`.
//!
//! ```text
//! cargo run --release --example echo          # serves $HOME/.khive/khived.sock
//! KHIVE_SOCKET=/tmp/echo/echo.sock cargo run --example echo
//! ```

use std::process::ExitCode;

use khived::{Config, Daemon, Dispatch, DispatchError, Request};

struct Echo;

impl Dispatch for Echo {
    async fn dispatch(&self, request: &Request<'_>) -> Result<String, DispatchError> {
        Ok(request.ops.to_string())
    }

    fn namespace(&self) -> &str {
        "echo"
    }

    fn config_id(&self) -> &str {
        ""
    }
}

fn main() -> ExitCode {
    khived::init_stderr_logger(log::LevelFilter::Info);
    match Daemon::new(Config::from_env(), Echo).run_blocking() {
        // 0 after a drain; 128 + n when a second signal forced the stop.
        Ok(stopped) => ExitCode::from(stopped.exit_code()),
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
