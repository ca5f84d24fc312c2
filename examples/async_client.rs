//! A smol program that talks to a running daemon with `AsyncClient`: one request, retried
//! while the daemon says it is busy or draining, then the other words pipelined on the same
//! connection.
//!
//! ```text
//! cargo run --example echo &                        # a daemon serving namespace "echo"
//! cargo run --example async_client -- hello warm world
//! ```

use std::process::ExitCode;
use std::time::Duration;

use khived::{AsyncClient, Request, Response};

/// The namespace and configuration id of `examples/echo.rs`.
const NAMESPACE: &str = "echo";
const CONFIG_ID: &str = "";

fn main() -> ExitCode {
    let words: Vec<String> = std::env::args().skip(1).collect();
    if words.is_empty() {
        eprintln!("usage: async_client WORD...");
        return ExitCode::from(2);
    }
    match async_io::block_on(run(&words)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("async_client: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(words: &[String]) -> std::io::Result<()> {
    let socket = khived::socket_path();
    let timeout = Duration::from_secs(5);
    let mut client = AsyncClient::connect(&socket, timeout).await?;
    let first = Request::new(words[0].as_str(), NAMESPACE, CONFIG_ID);
    let mut response = client.request(&first).await?;
    for _ in 0..5 {
        if !response.is_retryable() {
            break;
        }
        // Busy or draining: nothing ran, so asking again is safe. A busy daemon closes the
        // connection after saying so; a draining one may be replaced by a new daemon.
        async_io::Timer::after(Duration::from_millis(200)).await;
        client = AsyncClient::connect(&socket, timeout).await?;
        response = client.request(&first).await?;
    }
    show(&response);
    // The rest in one write; the answers come back in the same order, each with its
    // request's id (given by the client, as none was set).
    let rest: Vec<Request<'_>> = words[1..]
        .iter()
        .map(|word| Request::new(word.as_str(), NAMESPACE, CONFIG_ID))
        .collect();
    for response in client.pipeline(&rest).await? {
        show(&response);
    }
    Ok(())
}

fn show(response: &Response) {
    let id = response.request_id.unwrap_or_default();
    match (&response.result, &response.error_detail) {
        (Some(result), _) if response.ok => println!("#{id} ok: {result}"),
        (_, Some(detail)) => println!(
            "#{id} failed ({}, {:?}): {}",
            detail.code, detail.disposition, detail.message
        ),
        _ => println!("#{id} not served: {response:?}"),
    }
}
