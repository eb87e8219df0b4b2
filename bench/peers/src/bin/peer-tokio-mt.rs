//! The canonical tokio echo server ([`echoport_peers::tokio_echo`]) on the multi-thread
//! runtime (one worker per CPU).

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    echoport_peers::tokio_echo().await
}
